"""pyllm: fused attention, masked softmax and LayerNorm/RMSNorm kernels for PyTorch.

Layers: ``pyllm.nn`` (drop-in modules) -> ``pyllm.functional`` -> ``pyllm.ops`` (one slice
per op: schema, reference, fake, autograd) -> ``torch.ops.pyllm`` (C++/CUDA kernels), with the
pure-PyTorch reference as the fallback. ``import pyllm`` does not import transformers:
``import pyllm.hf`` does (and registers ``attn_implementation="pyllm"``).
"""
from . import _ext
from ._ext import build_info
from .backends import available_backends, current_backend, explain, last_decision, use_backend
from . import ops  # noqa: E402  (defines the schemas, fakes and autograd of every op)
from . import functional, reference  # noqa: E402
from . import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info", "available_backends", "current_backend", "explain", "last_decision", "use_backend",
    "ops", "functional", "reference", "nn", "__version__",
]
