"""Pure-PyTorch reference implementations: the spec, the fallback and the test oracle.

Each computes in fp32 (fp64 when given fp64) and returns the input dtype, exactly as
documented for the fused kernels; they are differentiable with ordinary autograd. Each is
defined in its op's slice (:mod:`pyllm.ops`); this module gathers them under the names of the
native ops: ``layer_norm(x, weight, bias, eps) -> (out, mean, rstd)`` and the others take the
flattened ``[rows, N]`` arguments of the native ops, ``scaled_dot_product_attention`` takes
the public signature.
"""
from __future__ import annotations

from .ops.attention import attention_keep
from .ops.attention import reference as scaled_dot_product_attention
from .ops.bias_gelu import reference as bias_gelu
from .ops.layer_norm import add_reference as add_layer_norm
from .ops.layer_norm import reference as layer_norm
from .ops.masked_softmax import causal_keep
from .ops.masked_softmax import reference as masked_softmax
from .ops.rms_norm import reference as rms_norm
from .ops.varlen_attention import reference as varlen_attention

__all__ = ["layer_norm", "add_layer_norm", "rms_norm", "masked_softmax", "scaled_dot_product_attention", "bias_gelu", "varlen_attention",
           "causal_keep", "attention_keep"]
