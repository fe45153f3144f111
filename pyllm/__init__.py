"""pyllm: fused attention, masked softmax and LayerNorm/RMSNorm kernels for PyTorch.

Layers: ``pyllm.nn`` (drop-in modules) -> ``pyllm.functional`` -> ``torch.ops.pyllm``
(C++/CUDA kernels), with ``pyllm.reference`` (pure PyTorch) as spec and fallback.
"""
from . import _ext
from ._ext import build_info
from .backends import available_backends, current_backend, explain, use_backend
from . import functional, reference  # noqa: E402
from . import nn  # noqa: E402

# With transformers installed, importing pyllm registers attn_implementation="pyllm".
import importlib.util as _ilu  # noqa: E402

if _ilu.find_spec("transformers") is not None:
    from . import hf  # noqa: F401,E402

__version__ = "0.1.0"

__all__ = [
    "build_info", "available_backends", "current_backend", "explain", "use_backend",
    "functional", "reference", "nn", "__version__",
]
