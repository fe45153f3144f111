"""Pure-PyTorch reference implementations: the spec, the fallback and the test oracle.

Each computes in fp32 (fp64 when given fp64) and returns the input dtype, exactly as
documented for the fused kernels. They are differentiable with ordinary autograd.
"""
from __future__ import annotations

import math

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim. Returns (out, mean, rstd); stats are fp32 [*lead]."""
    xf = _acc(x)
    # Shifted mean (pivot = each row's first value): exact enough that x - mean keeps its
    # low bits when |mean| >> std; a plain fp32 mean was 2.5x less accurate than torch's.
    pivot = xf[..., :1].detach()
    mean = pivot + (xf - pivot).mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if weight is not None:
        y = y * _acc(weight)
    if bias is not None:
        y = y + _acc(bias)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y.to(x.dtype), mean.squeeze(-1).to(stat), rstd.squeeze(-1).to(stat)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """summed = x + residual (in x's dtype); out = layer_norm(summed). Returns (out, summed, mean, rstd)."""
    summed = x + residual
    out, mean, rstd = layer_norm(summed, weight, bias, eps)
    return out, summed, mean, rstd


def rms_norm(x, weight=None, eps=1e-6, round_dtype=None, weight_offset=0.0, out_dtype=None):
    """RMSNorm over the last dim, generalized to cover torch's and Hugging Face's variants.

    n = x * rsqrt(mean(x^2) + eps) computed in fp32; if `round_dtype` is given, n is rounded
    to it (Llama rounds to the input dtype, T5 to a half weight's dtype); then
    y = n * (weight + weight_offset) in fp32 (Gemma uses offset 1), rounded to `out_dtype`.
    Returns (out, rstd).
    """
    xf = _acc(x)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    n = xf * rstd
    if round_dtype is not None:
        n = n.to(round_dtype).to(xf.dtype)
    if weight is not None:
        n = n * (_acc(weight) + weight_offset)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return n.to(out_dtype or x.dtype), rstd.squeeze(-1).to(stat)


def causal_keep(lq: int, lk: int, device=None, alignment: str = "top_left") -> torch.Tensor:
    """Bool [lq, lk] keep-mask. top_left: key j visible to query i if j <= i (SDPA's
    is_causal); bottom_right: if j <= i + (lk - lq) (decoding with a KV cache)."""
    i = torch.arange(lq, device=device).unsqueeze(-1)
    j = torch.arange(lk, device=device)
    shift = 0 if alignment == "top_left" else lk - lq
    return j <= i + shift


def masked_softmax(x, mask=None, scale=1.0, causal=False):
    """softmax(x * scale + mask) over the last dim, in fp32, returned in x's dtype.

    mask: bool (True = keep) or additive float, broadcastable to x. causal=True hides
    keys after the query (top-left). Rows with no visible key give zeros, not NaN.
    """
    if x.shape[-1] == 0:  # no keys: nothing to normalize (amax over an empty dim fails)
        return torch.empty_like(x)
    s = _acc(x) * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + _acc(mask)
    if causal:
        c = causal_keep(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    return p.to(x.dtype)


def attention_keep(lq: int, lk: int, device=None, is_causal: bool = False,
                   causal_alignment: str = "top_left", sliding_window=None):
    """Bool [lq, lk] keep-mask from causality and a sliding window, or None if neither.

    With alignment "bottom_right" query i sits at key position i + (lk - lq) (the last
    query sees the last key: decoding with a KV cache); with "top_left" at position i.
    sliding_window=(left, right): query at position p sees keys p - left .. p + right
    (-1 = unbounded on that side). is_causal forces right = 0.
    """
    if not is_causal and sliding_window is None:
        return None
    i = torch.arange(lq, device=device).unsqueeze(-1)
    if causal_alignment == "bottom_right":
        i = i + (lk - lq)
    j = torch.arange(lk, device=device)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if is_causal:
        keep &= j <= i
    if sliding_window is not None:
        left, right = sliding_window
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
    return keep


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, causal_alignment="top_left",
                                 sliding_window=None, return_lse=False):
    """Attention as ``F.scaled_dot_product_attention`` ([..., H, L, D] layout), computed in
    fp32 (fp64 for fp64 inputs), with one difference: a query whose keys are all masked
    gets zeros, never NaN. ``attn_mask``: bool (True = attend) or additive float,
    broadcastable to [..., Hq, Lq, Lk]. GQA: Hkv divides Hq (``enable_gqa``).
    Dropout (training) uses torch's RNG on the probabilities.
    """
    q, k, v = _acc(query), _acc(key), _acc(value)
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    d = q.shape[-1]
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d) if scale is None else scale)
    keep = attention_keep(q.shape[-2], k.shape[-2], q.device, is_causal, causal_alignment, sliding_window)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else (attn_mask & keep)
        else:
            s = s + _acc(attn_mask)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = e / safe
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = (p @ v).to(query.dtype)
    if return_lse:
        lse = torch.where(denom > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
        return out, lse.squeeze(-1)
    return out
