"""Fused scaled-dot-product attention: one slice.

Kernels: csrc/cpu/attention.cpp (flash-style, any head dim), csrc/cuda/attention.cu (SIMT,
head dims up to :data:`CUDA_MAX_HEAD_DIM`); they register ``attention`` and
``attention_backward`` themselves. The public function is ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as TF

from .. import backends
from . import BadInput, BenchCase, Limits, OpSpec, Sample, register
from ._common import (check_finite, check_flag, check_float, check_mask, check_same_device, check_window, empty,
                      run)
from .masked_softmax import padding_keep

# The CUDA kernels (and their emulation) keep a row of the output in registers.
CUDA_MAX_HEAD_DIM = 256
# fp32 on CUDA: pyllm's fp32 kernel is the SIMT one (no tensor cores), which the performance model
# (docs/GPU.md) puts below torch's own attention; `auto` runs torch instead (SDPA when the call is
# mask-free, else the fp32 composition), unless its [B, H, Lq, Lk] fp32 scores would exceed this
# many bytes: then the SIMT kernel, whose memory does not grow with Lq * Lk.
CUDA_FP32_TORCH_MAX_SCORE_BYTES = 1 << 30

CUDA_RULE = ("CUDA: fp16/bf16 with head dims <= 256 -> tensor-core kernel (attention_tc.cu); "
             "fp32 -> torch (SDPA without a mask, else the fp32 composition) unless the fp32 scores "
             f"would exceed {CUDA_FP32_TORCH_MAX_SCORE_BYTES >> 30} GiB, then the SIMT kernel; "
             f"head dims > {CUDA_MAX_HEAD_DIM} -> torch")


def _limit_check(path, head_dim, dtype=None, score_elems=0, backend=None):
    if path in ("native-cuda", "cuda-emulated") and head_dim > CUDA_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {CUDA_MAX_HEAD_DIM} (CUDA kernel limit)"
    if (path == "native-cuda" and backend == "auto" and dtype == torch.float32
            and 4 * score_elems <= CUDA_FP32_TORCH_MAX_SCORE_BYTES):
        return ("float32 on CUDA: torch's attention is faster than pyllm's SIMT fp32 kernel "
                "(no tensor cores; docs/GPU.md)")
    return None


LIMITS = Limits(check=_limit_check,
                notes=f"CPU: any head dim; {CUDA_RULE}")


# --------------------------------------------------------------------------- reference
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


def alibi_bias(slopes: torch.Tensor, lq: int, lk: int, shift: int, dtype=None) -> torch.Tensor:
    """ALiBi as a dense additive bias: ``-slope * |i + shift - j|`` for query i and key j, shaped
    ``[*slopes.shape, lq, lk]`` (slopes ``[H]`` or ``[B, H]``). The kernels compute it on the fly."""
    dtype = dtype or slopes.dtype
    i = torch.arange(lq, device=slopes.device, dtype=dtype).unsqueeze(-1) + shift
    j = torch.arange(lk, device=slopes.device, dtype=dtype)
    return -slopes.to(dtype)[..., None, None] * (i - j).abs()


def check_alibi(alibi_slopes, heads: int, batch_shapes, ref, ref_name: str) -> None:
    """ALiBi slopes: a floating tensor of shape [heads] or [*batch, heads] on ``ref``'s device."""
    if alibi_slopes is None:
        return
    check_float(alibi_slopes, "alibi_slopes")
    check_same_device(alibi_slopes, "alibi_slopes", ref, ref_name)
    shapes = [[heads]] + [[*b, heads] for b in batch_shapes]
    if list(alibi_slopes.shape) not in shapes:
        raise ValueError(f"pyllm: alibi_slopes must have shape {' or '.join(map(str, shapes))} (one slope per query "
                         f"head), got {list(alibi_slopes.shape)}")


# --------------------------------------------------------------------------- non-finite rule
# A key whose probability for a query is exactly zero (hidden by a mask, the causal/window geometry
# or an additive -inf; every key of a fully masked row) contributes nothing to that query, forward or
# backward, even when its K or V, or the query's dO, holds a NaN or an Inf: IEEE 0 * NaN = NaN would
# spread it. This is FlashAttention's behaviour (hidden keys are never read) and the only one a
# kernel that skips hidden tiles can keep; pyllm's kernels and this reference all follow it. The two
# products of attention are therefore "zero-skipping" here: dense matmuls when the operand is finite
# (the common case: one isfinite pass), and only otherwise the terms that meet a zero are dropped.


def _zmm(a, b):
    """a @ b with the terms whose a-entry is exactly 0 skipped (see above). Under torch.compile the
    plain product (no data-dependent branch)."""
    if torch.compiler.is_compiling():
        return a @ b
    fin = torch.isfinite(b)
    if bool(fin.all()):
        return a @ b
    out = a @ torch.where(fin, b, 0)
    nz_pos, nz_neg = (a > 0).to(a.dtype), (a < 0).to(a.dtype)
    nz = (a != 0).to(a.dtype)  # NaN entries of a count too: NaN * finite is NaN already in `out`
    nan = nz @ torch.isnan(b).to(a.dtype)
    pinf, ninf = (b == float("inf")).to(a.dtype), (b == float("-inf")).to(a.dtype)
    pos = nz_pos @ pinf + nz_neg @ ninf   # terms that are +inf
    neg = nz_pos @ ninf + nz_neg @ pinf   # terms that are -inf
    out = torch.where(pos > 0, float("inf"), out)
    out = torch.where(neg > 0, float("-inf"), out)
    return torch.where((nan > 0) | ((pos > 0) & (neg > 0)), float("nan"), out)


class _ScoreMatmul(torch.autograd.Function):
    """q @ k^T; its backward skips the zero score gradients (hidden keys): dq = dS k, dk = dS^T q."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.save_for_backward(q, k)
        return q @ k.transpose(-2, -1)

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        return _zmm(g, k), _zmm(g.transpose(-2, -1), q)


class _ProbMatmul(torch.autograd.Function):
    """p @ v skipping zero probabilities; backward: dp = dO v^T (zero where p is zero), dv = p^T dO."""

    @staticmethod
    def forward(ctx, p, v):
        ctx.save_for_backward(p, v)
        return _zmm(p, v)

    @staticmethod
    def backward(ctx, g):
        p, v = ctx.saved_tensors
        dp = (g @ v.transpose(-2, -1)).masked_fill(p == 0, 0.0)
        return dp, _zmm(p.transpose(-2, -1), g)


def reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False, causal_alignment="top_left",
              sliding_window=None, return_lse=False, alibi_slopes=None):
    """Attention as ``F.scaled_dot_product_attention`` ([..., H, L, D] layout), computed in
    fp32 (fp64 for fp64 inputs), with one difference: a query whose keys are all masked
    gets zeros, never NaN. ``attn_mask``: bool (True = attend) or additive float,
    broadcastable to [..., Hq, Lq, Lk]. GQA: Hkv divides Hq (``enable_gqa``).
    Dropout (training) uses torch's RNG on the probabilities.
    """
    if (query.is_cuda and query.dtype == torch.float32 and attn_mask is None and alibi_slopes is None
            and sliding_window is None and not return_lse and key.shape[-2] > 0
            and (not is_causal or causal_alignment == "top_left" or query.shape[-2] == key.shape[-2])):
        # torch's fused SDPA keeps these semantics exactly (no row can be fully masked).
        return TF.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=query.shape[-3] != key.shape[-3])
    acc = (lambda t: t if t.dtype == torch.float64 else t.float())
    q, k, v = acc(query), acc(key), acc(value)
    if k.shape[-2] == 0:  # no keys: every query is fully masked
        out = q.new_zeros((*q.shape[:-1], v.shape[-1])).to(query.dtype)
        lse = q.new_full(q.shape[:-1], float("-inf"))
        return (out, lse) if return_lse else out
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    d = q.shape[-1]
    s = _ScoreMatmul.apply(q, k) * (1.0 / math.sqrt(d) if scale is None else scale)
    if alibi_slopes is not None:
        lq, lk = q.shape[-2], k.shape[-2]
        shift = lk - lq if causal_alignment == "bottom_right" else 0
        s = s + alibi_bias(alibi_slopes.detach(), lq, lk, shift, s.dtype)
    keep = attention_keep(q.shape[-2], k.shape[-2], q.device, is_causal, causal_alignment, sliding_window)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else (attn_mask & keep)
        else:
            s = s + acc(attn_mask)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # No gradient reaches a hidden score, whatever hid it (an additive -inf included): see above.
    hidden = (s == float("-inf")).detach()
    s = s.masked_fill(hidden, float("-inf"))
    # A query whose keys are all masked gets zeros (and zero gradients), never NaN.
    dead = hidden.all(-1, keepdim=True)
    s = torch.where(dead, torch.zeros_like(s), s)
    p = torch.softmax(s, -1)
    p = p.masked_fill(hidden, 0.0)  # hidden keys (dead rows too): exactly 0, in a NaN row as well
    if dropout_p > 0.0:
        p = TF.dropout(p, dropout_p, training=True)
    out = _ProbMatmul.apply(p, v).to(query.dtype)
    if return_lse:
        lse = torch.where(dead, torch.full_like(dead, float("-inf"), dtype=s.dtype), s.logsumexp(-1, keepdim=True))
        return out, lse.squeeze(-1)
    return out


# --------------------------------------------------------------------------- public wrapper
def _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                causal_alignment, sliding_window):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        check_float(t, name)
    for t, name in ((key, "key"), (value, "value")):
        check_same_device(t, name, query, "query")
        if t.dtype != query.dtype:
            raise TypeError(f"pyllm: {name} must have query's dtype {query.dtype}, got {t.dtype}")
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"pyllm: query, key and value must have the same rank >= 3 ([..., H, L, D]); got shapes "
            f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"pyllm: batch dims differ: query {list(query.shape)}, key {list(key.shape)}, "
                         f"value {list(value.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"pyllm: query and key head dims differ ({query.shape[-1]} vs {key.shape[-1]})")
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(f"pyllm: key {list(key.shape)} and value {list(value.shape)} must agree on "
                         f"heads and length")
    hq, hk = query.shape[-3], key.shape[-3]
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"pyllm: query has {hq} heads but key/value have {hk}; pass "
                             f"enable_gqa=True for grouped-query attention")
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"pyllm: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    check_dropout(dropout_p)
    check_flag(is_causal, "is_causal")
    check_flag(enable_gqa, "enable_gqa")
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"pyllm: causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")
    if sliding_window is not None:
        sliding_window = check_window(sliding_window, "sliding_window")
    check_scale(scale, "scale", query.shape[-1])
    if attn_mask is not None:
        check_mask(attn_mask, "attn_mask", "attend", query, "query", (*query.shape[:-1], key.shape[-2]),
                   "the scores' shape ([..., Hq, Lq, Lk])")
    return sliding_window


def check_dropout(dropout_p) -> None:
    check_finite(dropout_p, "dropout_p")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"pyllm: dropout_p must be in [0, 1), got {dropout_p}")


def check_scale(scale, name: str, head_dim: int) -> None:
    """The softmax scale: None (1/sqrt(head dim), which needs a head dim >= 1) or a finite number."""
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"pyllm: {name} must be a Python number or None, got {type(scale).__name__}")
    check_finite(scale, name, allow_none=True)
    if scale is None and head_dim == 0:
        raise ValueError(f"pyllm: the head dim is 0, so the default {name} 1/sqrt(head_dim) is undefined; "
                         f"pass {name} explicitly")


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, causal_alignment: str = "top_left",
                                 sliding_window: Optional[tuple] = None,
                                 alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` ([..., H, L, D]).

    Differences and extras: a query whose keys are all masked gets zeros, never NaN;
    ``causal_alignment="bottom_right"`` aligns the causal mask to the end of the keys
    (decoding with a KV cache, Lq < Lk); ``sliding_window=(left, right)`` restricts each
    query to nearby keys (-1 = unbounded). Masks may have any broadcastable shape/strides.
    ``alibi_slopes`` (``[Hq]`` or ``[*batch, Hq]``, as FlashAttention) adds ``-slope * |i + shift - j|``
    to the scaled scores, computed in the kernel (shift = Lk - Lq with bottom-right alignment, else
    0); the slopes get no gradient.
    """
    sliding_window = _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 causal_alignment, sliding_window)
    check_alibi(alibi_slopes, query.shape[-3], [query.shape[:-3]] if query.dim() > 3 else [], query, "query")
    dmax = max(query.shape[-1], value.shape[-1])
    scores = math.prod(query.shape[:-1]) * key.shape[-2]
    d = backends.select("scaled_dot_product_attention", (query, key, value, attn_mask), LIMITS,
                        (dmax, query.dtype, scores, backends.current_backend()), typed=(query, key, value))
    if d.uses_kernel:
        return _kernel(d.ns, query, key, value, attn_mask, dropout_p, is_causal, scale,
                       causal_alignment, sliding_window, alibi_slopes)
    return reference(query, key, value, attn_mask, dropout_p, is_causal, scale,
                     enable_gqa, causal_alignment, sliding_window, alibi_slopes=alibi_slopes)


def _kernel(ns, query, key, value, attn_mask, dropout_p, is_causal, scale, causal_alignment, sliding_window,
            alibi_slopes=None):
    """Runs ``ns.attention`` on [B, H, L, D] views of the arguments (leading dims flattened)."""
    lead = query.shape[:-3]
    hq, lq, d = query.shape[-3:]
    lk = key.shape[-2]
    mask = attn_mask
    if query.dim() != 4:
        b = math.prod(lead)
        q = query.reshape(b, hq, lq, d)
        k = key.reshape(b, *key.shape[-3:])
        v = value.reshape(b, *value.shape[-3:])
        if mask is not None:
            # Leading dims of the mask broadcast over the flattened batch: a view when they
            # merge (the usual case), else one copy of the mask at the scores' size.
            mask = mask.expand(*lead, hq, lq, lk).reshape(b, hq, lq, lk) if query.dim() > 4 else mask
    else:
        q, k, v = query, key, value
    if mask is not None and mask.dtype == torch.float64:
        mask = mask.float()
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.detach().float()
        alibi = alibi.reshape(-1, hq) if alibi.dim() > 1 else alibi
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    wl, wr = (-1, -1) if sliding_window is None else (int(sliding_window[0]), int(sliding_window[1]))
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
    out = run(ns.attention, (q, k, v, mask), q, k, v, mask, scale, bool(is_causal),
              causal_alignment == "bottom_right", wl, wr, float(dropout_p), seed, alibi)[0]
    return out.reshape(*lead, hq, lq, value.shape[-1])


def torch_keep(lq: int, lk: int, shift: int, causal: bool, window, device=None) -> torch.Tensor:
    """Bool [lq, lk] keep-mask from torch.tril/triu (the torch baselines' geometry, written apart from
    the reference's attention_keep): query i sits at key position i + shift; window = (left, right),
    -1 = unbounded; causal caps right at 0."""
    ones = torch.ones(lq, lk, dtype=torch.bool, device=device)
    keep = ones
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        keep = keep & ones.tril(shift + right)
    if left >= 0:
        keep = keep & ones.triu(shift - left)
    return keep


def torch_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, *, causal_alignment="top_left", sliding_window=None, alibi_slopes=None):
    """The plain torch baseline: ``F.scaled_dot_product_attention`` with causality and the window
    folded into an explicit bool mask; queries whose keys are all masked set to zero (SDPA gives NaN)."""
    lq, lk = query.shape[-2], key.shape[-2]
    keep = None
    if is_causal or sliding_window is not None:
        shift = lk - lq if causal_alignment == "bottom_right" else 0
        keep = torch_keep(lq, lk, shift, is_causal, sliding_window, query.device)
    mask = attn_mask
    if alibi_slopes is not None:  # ALiBi as an explicit float bias, built with tensor ops apart from the reference
        shift = lk - lq if causal_alignment == "bottom_right" else 0
        pos = torch.arange(lq, device=query.device).unsqueeze(-1) + shift
        dist = (pos - torch.arange(lk, device=query.device)).abs().to(torch.float64)
        bias = (-(alibi_slopes.detach().to(torch.float64).unsqueeze(-1).unsqueeze(-1)) * dist)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = mask.to(torch.float64) + bias
    if keep is not None:
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = TF.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=enable_gqa)
    if mask is None:
        return out
    visible = (mask if mask.dtype == torch.bool else mask > float("-inf"))
    visible = visible.expand(*out.shape[:-1], lk).any(-1, keepdim=True)
    return torch.where(visible, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- fakes + autograd
SCHEMAS = {
    "attention": "(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, bool causal, "
                 "bool bottom_right, int window_left, int window_right, float dropout_p, int seed, "
                 "Tensor? alibi_slopes=None) -> (Tensor, Tensor)",
    "attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor out, "
                          "Tensor lse, float scale, bool causal, bool bottom_right, int window_left, "
                          "int window_right, float dropout_p, int seed, bool mask_grad, "
                          "Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor, Tensor)",
}


def _register(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::attention")
    def _(q, k, v, mask, scale, causal, bottom_right, wl, wr, dropout_p, seed, alibi=None):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention expects 4-D q/k/v")
        b, hq, lq, _d = q.shape
        return empty((b, hq, lq, v.shape[-1]), q), empty((b, hq, lq), q, torch.float32)

    @torch.library.register_fake(f"{ns}::attention_backward")
    def _(gout, q, k, v, mask, out, lse, scale, causal, bottom_right, wl, wr, dropout_p, seed, mask_grad, alibi=None):
        b, hq, lq, _d = q.shape
        want = mask_grad and mask is not None and mask.dtype != torch.bool
        dmask = empty((b, hq, lq, k.shape[-2]), q, torch.float32) if want else empty((0,), q, torch.float32)
        return empty(q.shape, q), empty(k.shape, k), empty(v.shape, v), dmask

    def setup(ctx, inputs, output):
        q, k, v, mask, scale, causal, bottom_right, wl, wr, dropout_p, seed, alibi = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse, alibi)
        ctx.args = (scale, causal, bottom_right, wl, wr, dropout_p, seed)

    def backward(ctx, gout, _glse):
        q, k, v, mask, out, lse, alibi = ctx.saved_tensors
        want_mask = bool(ctx.needs_input_grad[3]) and mask is not None and mask.dtype != torch.bool
        if gout is None:
            gout = torch.zeros_like(out)
        if out.dtype in (torch.float16, torch.bfloat16):
            # delta = rowsum(dO * O) from the output rounded to half precision loses the digits that
            # dS = P (dP - delta) cancels (found by the fuzzer: up to 4x torch's error at small head
            # dims). The kernels compute in fp32: rerun the forward in fp32 (same dropout seed) and
            # take delta from its unrounded output. One extra forward per half-precision backward.
            out = lib.attention(q.float(), k.float(), v.float(), mask, *ctx.args, alibi)[0]
        dq, dk, dv, dmask = lib.attention_backward(gout, q, k, v, mask, out, lse, *ctx.args, want_mask, alibi)
        dm = dmask.sum_to_size(mask.shape).to(mask.dtype) if want_mask else None
        return dq, dk, dv, dm, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::attention", backward, setup_context=setup)


# --------------------------------------------------------------------------- samples
def samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(4)

    def qkv(b, hq, hk, lq, lk, d):
        mk = lambda h, l: torch.randn(b, h, l, d, generator=g).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
        return mk(hq, lq), mk(hk, lk), mk(hk, lk)

    out = []
    for lq, lk, d, causal, align in ((7, 7, 64, False, "top_left"), (1, 97, 80, True, "bottom_right"),
                                     (33, 33, 111, True, "top_left"), (128, 256, 128, False, "top_left")):
        q, k, v = qkv(2, 4, 2, lq, lk, d)
        keep = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        keep[1, ..., lk - lk // 3:] = False
        out.append(Sample((q, k, v, keep.to(device)), dict(is_causal=causal, enable_gqa=True,
                                                           causal_alignment=align),
                          desc=f"GQA Lq{lq} Lk{lk} D{d} causal={causal} {align}"))
    q, k, v = qkv(1, 2, 2, 17, 17, 16)
    bias = torch.randn(1, 2, 17, 17, generator=g).to(device, dtype)
    out.append(Sample((q, k, v, bias), dict(sliding_window=(4, 2)), desc="additive mask, window (4, 2)"))
    q, k, v = qkv(2, 4, 2, 5, 40, 32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]).to(device)
    out.append(Sample((q, k, v), dict(is_causal=True, enable_gqa=True, causal_alignment="bottom_right",
                                      alibi_slopes=slopes), desc="ALiBi [H], bottom-right causal, GQA"))
    q, k, v = qkv(2, 2, 2, 33, 33, 16)
    out.append(Sample((q, k, v), dict(alibi_slopes=torch.rand(2, 2, generator=g).to(device)),
                      desc="ALiBi [B, H], no causal mask"))
    return out


def native_samples():
    g = dict(requires_grad=True)
    q, k, v = (torch.randn(1, 2, 5, 8, **g) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5) > 0.3
    out, lse = torch.ops.pyllm.attention(q.detach(), k.detach(), v.detach(), None, 0.35, True, False,
                                         -1, -1, 0.0, 0)
    return {
        "attention": [(q, k, v, None, 0.35, True, False, -1, -1, 0.0, 0),
                      (q, k, v, keep, 0.35, False, False, 2, -1, 0.0, 0),
                      (q, k, v, torch.randn(1, 2, 5, 5, **g), 0.35, False, True, -1, -1, 0.0, 0),
                      (q, k, v, keep, 0.35, True, True, -1, -1, 0.0, 0, torch.tensor([0.5, 0.25]))],
        "attention_backward": [(torch.randn(1, 2, 5, 8), q.detach(), k.detach(), v.detach(), None, out, lse,
                                0.35, True, False, -1, -1, 0.0, 0, False)],
    }


def bad_inputs():
    q = torch.randn(1, 2, 4, 8)
    sdpa = scaled_dot_product_attention
    return [
        BadInput(lambda: sdpa(q, q[..., :4], q), ValueError, r"head dims differ \(8 vs 4\)", "head dims"),
        BadInput(lambda: sdpa(q, q[:, :1], q[:, :1]), ValueError, "pass enable_gqa=True", "heads"),
        BadInput(lambda: sdpa(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), enable_gqa=True), ValueError,
                 r"query heads \(2\) must be a multiple of key/value heads \(3\)", "GQA divisibility"),
        BadInput(lambda: sdpa(q, q, q, torch.ones(3, 4, dtype=torch.bool)), ValueError,
                 r"attn_mask of shape \[3, 4\] is not broadcastable", "mask shape"),
        BadInput(lambda: sdpa(q, q, q, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)", "dropout"),
        BadInput(lambda: sdpa(q, q.half(), q), TypeError, "key must have query's dtype", "dtype"),
        BadInput(lambda: sdpa(q[0, 0], q[0, 0], q[0, 0]), ValueError, "same rank >= 3", "rank"),
        BadInput(lambda: sdpa(q, q, q, causal_alignment="bottom"), ValueError, "causal_alignment must be",
                 "alignment"),
        BadInput(lambda: sdpa(q, q, q, sliding_window=3), TypeError, "sliding_window must be a", "window"),
        BadInput(lambda: sdpa(q, q, q, alibi_slopes=torch.ones(3)), ValueError,
                 r"alibi_slopes must have shape \[2\] or \[1, 2\] \(one slope per query head\), got \[3\]",
                 "alibi shape"),
        BadInput(lambda: sdpa(q, q, q, alibi_slopes=torch.ones(2, dtype=torch.int32)), TypeError,
                 "alibi_slopes must be a floating tensor", "alibi dtype"),
        BadInput(lambda: sdpa(q, q, q, alibi_slopes=torch.ones(2, device="meta")), ValueError,
                 "alibi_slopes is on meta but query is on cpu", "alibi device"),
        BadInput(lambda: sdpa(q, q, q, alibi_slopes=torch.ones(1, 1, 2)), ValueError,
                 r"alibi_slopes must have shape \[2\] or \[1, 2\] .*got \[1, 1, 2\]", "alibi rank"),
        BadInput(lambda: sdpa(q, q, q, dropout_p="0.1"), TypeError, "dropout_p must be a Python number, got str",
                 "dropout str"),
        BadInput(lambda: sdpa(q, q, q, dropout_p=None), TypeError, "dropout_p must be a Python number, got NoneType",
                 "dropout None"),
        BadInput(lambda: sdpa(q, q, q, dropout_p=float("nan")), ValueError, "dropout_p must be a finite number",
                 "dropout NaN"),
        BadInput(lambda: sdpa(q, q, q, dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1",
                 "dropout negative"),
        BadInput(lambda: sdpa(q, q, q, scale=True), TypeError, "scale must be a Python number or None, got bool",
                 "scale bool"),
        BadInput(lambda: sdpa(q, q, q, scale=float("nan")), ValueError, "scale must be a finite number, got nan",
                 "scale NaN"),
        BadInput(lambda: sdpa(q, q, q, is_causal="no"), TypeError, "is_causal must be a bool, got str 'no'",
                 "is_causal str"),
        BadInput(lambda: sdpa(q, q[:, :1], q[:, :1], enable_gqa=1), TypeError, "enable_gqa must be a bool, got int",
                 "enable_gqa int"),
        BadInput(lambda: sdpa(q, q, q, sliding_window=(True, 0)), TypeError, "sliding_window must be a .* pair of ints",
                 "window bool"),
        BadInput(lambda: sdpa(q, q, q, sliding_window=(-5, 0)), ValueError,
                 r"sliding_window left width must be -1 \(unbounded\) or >= 0, got -5", "window negative"),
        BadInput(lambda: sdpa(q[..., :0], q[..., :0], q), ValueError,
                 r"head dim is 0, so the default scale 1/sqrt\(head_dim\) is undefined", "head dim 0"),
        BadInput(lambda: sdpa(q, q, q[:, :, :3]), ValueError, r"key \[1, 2, 4, 8\] and value \[1, 2, 3, 8\] must agree",
                 "key/value length"),
        BadInput(lambda: sdpa(q, q.expand(2, 2, 4, 8), q.expand(2, 2, 4, 8)), ValueError, "batch dims differ",
                 "no batch broadcast"),
    ]


def bench_cases(dtype, device, quick):
    g = torch.Generator().manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    es = torch.tensor([], dtype=dtype).element_size()
    sdpa_name, eager_name = "F.scaled_dot_product_attention", "eager matmul+softmax+matmul"

    def qkv(b, h, lq, lk, d):
        mk = lambda l: torch.randn(b, h, l, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        return mk(lq), mk(lk), mk(lk)

    def eager(q, k, v, keep=None):
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    sdpa = scaled_dot_product_attention
    cases = []
    b, h, l, d = (1, 2, 32, 16) if quick else (8, 12, 512, 64)  # BERT-base encoder with a padding mask
    q, k, v = qkv(b, h, l, l, d)
    mask = padding_keep(b, l, device, g)
    cases.append(BenchCase(
        "scaled_dot_product_attention", "bert padding", f"B{b} H{h} L{l} D{d}", dtype,
        lambda: sdpa(q, k, v, attn_mask=mask),
        {sdpa_name: lambda: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask),
         eager_name: lambda: eager(q, k, v, mask)},
        bytes=4 * q.numel() * es + mask.numel(), flops=4.0 * b * h * l * l * d, tol=tol))
    b, h, l, d = (1, 2, 64, 16) if quick else (4, 12, 1024, 64)  # GPT causal self-attention
    q2, k2, v2 = qkv(b, h, l, l, d)
    causal = torch.ones(l, l, dtype=torch.bool, device=device).tril()
    cases.append(BenchCase(
        "scaled_dot_product_attention", "gpt causal", f"B{b} H{h} L{l} D{d}", dtype,
        lambda: sdpa(q2, k2, v2, is_causal=True),
        {sdpa_name: lambda: TF.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
         eager_name: lambda: eager(q2, k2, v2, causal)},
        bytes=4 * q2.numel() * es, flops=4.0 * b * h * l * l * d / 2, tol=tol))
    b, h, lk, d = (1, 2, 64, 16) if quick else (8, 12, 2048, 64)  # one decode step against a KV cache
    q3, k3, v3 = qkv(b, h, 1, lk, d)
    cases.append(BenchCase(
        "scaled_dot_product_attention", "decode q_len 1", f"B{b} H{h} Lq1 Lk{lk} D{d}", dtype,
        lambda: sdpa(q3, k3, v3),
        {sdpa_name: lambda: TF.scaled_dot_product_attention(q3, k3, v3), eager_name: lambda: eager(q3, k3, v3)},
        bytes=(2 * q3.numel() + 2 * k3.numel()) * es, flops=4.0 * b * h * 1 * lk * d, tol=tol))
    return cases


register(OpSpec(
    name="scaled_dot_product_attention", functional=scaled_dot_product_attention, reference=reference,
    torch_baseline=torch_attention, schemas=SCHEMAS, register=_register, native_samples=native_samples,
    samples=samples, bad_inputs=bad_inputs, bench_cases=bench_cases, limits=LIMITS,
    kernels=("csrc/cpu/attention.cpp", "csrc/cuda/attention.cu")))
