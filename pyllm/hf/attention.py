"""pyllm attention for Hugging Face transformers, registered as ``attn_implementation="pyllm"``.

transformers calls an attention implementation as ``fn(module, query, key, value, attention_mask,
scaling=..., dropout=..., **kwargs)`` with ``query``/``key``/``value`` in ``[B, H, L, D]`` layout and
expects ``(output [B, L, H, D], attention_weights or None)``. The mask comes from the mask function
registered under the same name (:func:`transformers.masking_utils.sdpa_mask`: a bool
``[B, 1, Lq, Lk]`` mask, True = attend, or ``None`` when causality alone describes it), exactly as
for the stock ``"sdpa"`` implementation, so every mask a model builds (padding, causal, sliding
window, chunked, packed sequences) reaches pyllm unchanged.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import functional as F

NAME = "pyllm"

_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping (Gemma 2)",
    "s_aux": "attention sinks (gpt-oss)",
    "sinks": "attention sinks",
}
_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, is_causal: Optional[bool] = None,
                      position_bias: Optional[torch.Tensor] = None, **kwargs):
    """The ``"pyllm"`` attention implementation (see the module docstring)."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"pyllm attention does not support {what} (`{name}` was passed by "
                f"{type(module).__name__}); load this model with attn_implementation='eager' or 'sdpa'")
    if kwargs.get("cache") is not None:
        raise NotImplementedError("pyllm attention does not support paged attention caches "
                                  "(continuous batching); use attn_implementation='sdpa'")
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions", "pyllm attention does not return attention weights "
                   "(output_attentions=True gives None); use attn_implementation='eager' for them")

    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None and query.shape[0] == 1 and attention_mask is None and position_bias is None:
        # Packed sequences (transformers' padding-free kwargs, set by pyllm.hf's padding-free
        # encoders or a flattening data collator): attention per sequence, no pad token, no mask.
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        out = F.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                 cu_q, cu_k, max_q, max_k, float(dropout) if module.training else 0.0,
                                 softmax_scale=scaling, causal=bool(is_causal))
        return out.unsqueeze(0), None
    # As the stock "sdpa" path: the mask function returns None only when causality alone (top-left
    # aligned: equal lengths, or a prefill into an empty static cache) or nothing at all describes
    # the mask; a single query token (decoding) sees every cached key.
    causal = bool(q_len > 1 and attention_mask is None and is_causal)

    sliding = None
    window = kwargs.get("sliding_window")
    if attention_mask is None and isinstance(window, int) and window > 0 and kv_len > window:
        # transformers encodes the window in the mask and only skips the mask when the window cannot
        # matter; this keeps a hand-made call without a mask correct as well.
        sliding = (window - 1, -1)

    mask = attention_mask
    if position_bias is not None:  # T5-style relative position bias: one additive float mask
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~mask, float("-inf"))
        else:
            mask = position_bias + mask

    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=float(dropout) if module.training else 0.0,
        is_causal=causal, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        causal_alignment="top_left" if q_len > 1 else "bottom_right", sliding_window=sliding)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"pyllm"`` with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent). Called when :mod:`pyllm.hf` is imported."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
