"""Drop-in modules. Each subclasses its torch counterpart (same constructor, parameters,
``state_dict`` keys and repr; ``isinstance(m, torch.nn.LayerNorm)`` holds) and runs
pyllm's fused kernels in ``forward``."""
from .norm import LayerNorm, RMSNorm
from .softmax import FusedScaleMaskSoftmax
from .attention import MultiheadAttention

__all__ = ["LayerNorm", "RMSNorm", "FusedScaleMaskSoftmax", "MultiheadAttention"]
