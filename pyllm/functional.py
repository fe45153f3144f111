"""Public functional API, mirroring torch.nn.functional's signatures.

Each op lives in its own slice under :mod:`pyllm.ops` (validation, backend decision,
native call or reference); this module is the public face that gathers them.
"""
from __future__ import annotations

from .ops.attention import scaled_dot_product_attention
from .ops.bias_gelu import bias_gelu
from .ops.varlen_attention import pad_input, unpad_input, varlen_attention
from .ops.layer_norm import add_layer_norm, add_layer_norm_, layer_norm
from .ops.masked_softmax import masked_softmax
from .ops.rms_norm import STYLES as RMS_STYLES
from .ops.rms_norm import add_rms_norm, rms_norm

__all__ = ["layer_norm", "add_layer_norm", "add_layer_norm_", "rms_norm", "add_rms_norm", "masked_softmax", "scaled_dot_product_attention",
           "bias_gelu", "varlen_attention", "unpad_input", "pad_input"]
