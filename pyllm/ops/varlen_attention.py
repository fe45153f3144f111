"""Variable-length (packed, padding-free) attention with FlashAttention's varlen layout: one slice.

``varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`` takes
B sequences packed back to back: q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v
``[total_k, Hkv, Dv]``; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v. No pad token is ever computed.

Alignment (as FlashAttention >= 2.1): within each sequence, query ``i`` of ``Lq`` sits at key
position ``i + Lk - Lq`` (bottom-right). ``causal=True`` lets it see keys ``j <= i + Lk - Lq``;
``window_size=(left, right)`` keys ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (-1 =
unbounded). With Lq = Lk (self-attention) this is the usual causal mask::

    causal, Lq = 2, Lk = 5:      1 1 1 1 0
                                 1 1 1 1 1

A query that sees no key gets zeros (and lse = -inf), never NaN. GQA: Hkv divides Hq.
``alibi_slopes`` ``[Hq]`` or ``[B, Hq]`` adds ``-slope * |i + Lk - Lq - j|`` to the scaled scores (the
same bottom-right alignment), computed in the kernels.

Kernels: the CPU kernel (csrc/cpu/attention.cpp) runs one parallel loop over (sequence, query
block, head) tasks of the whole batch on the dense kernel's block machinery; the CUDA kernel
(csrc/cuda/attention.cu) runs each sequence on a view of the packed rows
(csrc/include/pyllm/varlen.h; no copies), as does the backward on both.
``unpad_input`` / ``pad_input`` convert between a padded batch and the packed layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as TF

from .. import backends
from . import BadInput, BenchCase, Limits, OpSpec, Sample, register
from ._common import check_flag, check_float, check_int, check_same_device, check_tensor, check_window, empty, local, run
from .attention import CUDA_MAX_HEAD_DIM, check_alibi, check_dropout, check_scale, torch_keep
from .attention import reference as dense_reference


def _limit_check(path, head_dim):
    if path in ("native-cuda", "cuda-emulated") and head_dim > CUDA_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {CUDA_MAX_HEAD_DIM} (CUDA kernel limit)"
    return None


LIMITS = Limits(check=_limit_check, notes=f"as attention: CPU any head dim, CUDA up to {CUDA_MAX_HEAD_DIM}")


# --------------------------------------------------------------------------- padding helpers
def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Removes the pad tokens of a batch: ``hidden`` ``[B, L, ...]``, ``attention_mask`` ``[B, L]``
    (nonzero/True = real token, any placement: left, right or holes).

    Returns ``(packed [T, ...], indices [T] int64, cu_seqlens [B + 1] int32, max_seqlen int)``:
    ``packed = hidden.flatten(0, 1)[indices]``, sequences in batch order, tokens in order."""
    check_tensor(hidden, "hidden")
    check_tensor(attention_mask, "attention_mask")
    if hidden.dim() < 2 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pyllm: attention_mask must have shape [batch, seqlen] = {list(hidden.shape[:2])} "
                         f"(hidden's first two dims), got {list(attention_mask.shape)}")
    check_same_device(attention_mask, "attention_mask", hidden, "hidden")
    keep = attention_mask.bool()
    seqlens = keep.sum(-1, dtype=torch.int32)
    indices = keep.flatten().nonzero().flatten()
    cu = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = seqlens.cumsum(0)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return hidden.flatten(0, 1)[indices], indices, cu, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``[T, ...]`` -> ``[batch, seqlen, ...]`` with zeros at pad positions."""
    check_tensor(packed, "packed")
    check_tensor(indices, "indices")
    if packed.dim() == 0:
        raise ValueError("pyllm: packed must have at least 1 dimension [T, ...], got a scalar")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"pyllm: indices must be an int64 or int32 tensor (unpad_input's), got {indices.dtype}")
    check_same_device(indices, "indices", packed, "packed")
    if indices.dim() != 1 or indices.numel() != packed.shape[0]:
        raise ValueError(f"pyllm: indices must be 1-D with one entry per packed row ({packed.shape[0]}), "
                         f"got shape {list(indices.shape)}")
    batch, seqlen = check_int(batch, "batch", minimum=0), check_int(seqlen, "seqlen", minimum=0)
    if indices.numel() and indices.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = (int(t) for t in torch.aminmax(indices))
        if lo < 0 or hi >= batch * seqlen:
            raise ValueError(f"pyllm: indices must be in [0, batch * seqlen) = [0, {batch * seqlen}), "
                             f"got values from {lo} to {hi}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out[indices] = packed
    return out.view(batch, seqlen, *packed.shape[1:])


# --------------------------------------------------------------------------- reference
def _bounds(cu):
    v = cu.tolist()
    return list(zip(v[:-1], v[1:]))


def reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
              softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False, alibi_slopes=None):
    """Each sequence through the dense reference (fp32 accumulation), bottom-right aligned."""
    outs, lses = [], []
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_seqlens_q), _bounds(cu_seqlens_k))):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        o, lse = dense_reference(qs, ks, vs, None, dropout_p, causal, softmax_scale, True, "bottom_right",
                                 window, return_lse=True, alibi_slopes=slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    out = torch.cat(outs) if outs else q.new_empty((0, q.shape[1], v.shape[2]))
    if return_lse:
        lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[1]), dtype=torch.float32)
        return out, lse.float()
    return out


# --------------------------------------------------------------------------- public wrapper
def _check_cu(cu, name, total, what):
    """The values of a (type-checked) cu_seqlens tensor; returns the sequence lengths."""
    v = local(cu).tolist()  # a DTensor's rule wants cu_seqlens replicated: its local copy is whole
    if v[0] != 0:
        raise ValueError(f"pyllm: {name} must start at 0, got {v[0]}")
    lens = [b - a for a, b in zip(v[:-1], v[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"pyllm: {name} must not decrease, got {v}")
    if v[-1] != total:
        raise ValueError(f"pyllm: {name} must end at the number of packed tokens of {what} ({total}), got {v[-1]}")
    return lens


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                     alibi_slopes=None, return_lse: bool = False):
    """FlashAttention's ``flash_attn_varlen_func`` semantics (see the module docstring).

    Returns ``out [total_q, Hq, Dv]``, and ``lse [total_q, Hq]`` (fp32) with ``return_lse=True``.
    ``alibi_slopes``: ``[Hq]`` or ``[batch, Hq]`` (fp32 in the kernels; no gradient)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_float(t, name)
    for t, name in ((k, "k"), (v, "v")):
        check_same_device(t, name, q, "q")
        if t.dtype != q.dtype:
            raise TypeError(f"pyllm: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"pyllm: q, k and v must be packed as [total_tokens, heads, head_dim], got shapes "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"pyllm: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"pyllm: k {list(k.shape)} and v {list(v.shape)} must agree on tokens and heads")
    hq, hk = q.shape[1], k.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"pyllm: q heads ({hq}) must be a multiple of k/v heads ({hk})")
    for cu, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        check_tensor(cu, name)
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 1:
            raise TypeError(f"pyllm: {name} must be a non-empty 1-D int32 or int64 tensor, got shape "
                            f"{list(cu.shape)} and dtype {cu.dtype}")
        check_same_device(cu, name, q, "q")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"pyllm: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    check_alibi(alibi_slopes, hq, [[cu_seqlens_q.shape[0] - 1]], q, "q")
    check_dropout(dropout_p)
    check_flag(causal, "causal")
    check_flag(return_lse, "return_lse")
    wl, wr = check_window(window_size, "window_size")
    check_scale(softmax_scale, "softmax_scale", q.shape[-1])
    if not torch.compiler.is_compiling():  # (max_seqlen is not used below: no int guards under compile)
        max_seqlen_q = check_int(max_seqlen_q, "max_seqlen_q", minimum=0)
        max_seqlen_k = check_int(max_seqlen_k, "max_seqlen_k", minimum=0)
        lq = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q")
        lk = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k")
        for lens, mx, name in ((lq, max_seqlen_q, "max_seqlen_q"), (lk, max_seqlen_k, "max_seqlen_k")):
            if lens and mx < max(lens):
                raise ValueError(f"pyllm: {name} ({mx}) is smaller than the longest sequence ({max(lens)})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    d = backends.select("varlen_attention", (q, k, v, cu_seqlens_q, cu_seqlens_k), LIMITS,
                        (max(q.shape[-1], v.shape[-1]),), typed=(q, k, v))
    if d.uses_kernel:
        seed = int(torch.randint(0, 2**62, (), device="cpu").item()) if dropout_p > 0.0 else 0
        alibi = None if alibi_slopes is None else alibi_slopes.detach().float()
        out, lse = run(d.ns.varlen_attention, (q, k, v), q, k, v, cu_seqlens_q, cu_seqlens_k, scale, bool(causal),
                       wl, wr, float(dropout_p), seed, alibi)
    else:
        out, lse = reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                             causal, (wl, wr), return_lse=True, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


def torch_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           alibi_slopes=None, return_lse=False):
    """The plain torch baseline: ``F.scaled_dot_product_attention`` per sequence, with causality and the
    window as an explicit bottom-right bool mask (ALiBi as a float bias); queries that see no key set to zero."""
    outs = []
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(cu_seqlens_q), _bounds(cu_seqlens_k))):
        lq, lk = q1 - q0, k1 - k0
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        if lq == 0:
            outs.append(q.new_zeros((0, q.shape[1], v.shape[2])))
            continue
        keep = torch_keep(lq, lk, lk - lq, causal, tuple(window_size), q.device)
        if lk == 0:
            o = qs.new_zeros((q.shape[1], lq, v.shape[2]))
        else:
            mask = keep
            if alibi_slopes is not None:
                slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
                dist = ((torch.arange(lq, device=q.device) + (lk - lq)).unsqueeze(-1)
                        - torch.arange(lk, device=q.device)).abs().to(torch.float64)
                mask = (-slopes.detach().to(torch.float64)[:, None, None] * dist).masked_fill(~keep, float("-inf"))
                mask = mask.to(q.dtype)
            o = TF.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale,
                                               enable_gqa=qs.shape[0] != ks.shape[0])
            o = torch.where(keep.any(-1, keepdim=True), o, torch.zeros_like(o))
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))  # an empty batch: no rows


# --------------------------------------------------------------------------- fakes + autograd
SCHEMAS = {
    "varlen_attention": "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale, "
                        "bool causal, int window_left, int window_right, float dropout_p, int seed, "
                        "Tensor? alibi_slopes=None) -> (Tensor, Tensor)",
    "varlen_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
                                 "Tensor cu_seqlens_k, Tensor out, Tensor lse, float scale, bool causal, "
                                 "int window_left, int window_right, float dropout_p, int seed, "
                                 "Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)",
}


def _register(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::varlen_attention")
    def _(q, k, v, cu_q, cu_k, scale, causal, wl, wr, dropout_p, seed, alibi=None):
        torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "varlen q/k/v must be 3-D")
        return empty((q.shape[0], q.shape[1], v.shape[2]), q), empty((q.shape[0], q.shape[1]), q, torch.float32)

    @torch.library.register_fake(f"{ns}::varlen_attention_backward")
    def _(gout, q, k, v, cu_q, cu_k, out, lse, scale, causal, wl, wr, dropout_p, seed, alibi=None):
        return empty(q.shape, q), empty(k.shape, k), empty(v.shape, v)

    def setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, scale, causal, wl, wr, dropout_p, seed, alibi = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, alibi)
        ctx.args = (scale, causal, wl, wr, dropout_p, seed)

    def backward(ctx, gout, _glse):
        q, k, v, cu_q, cu_k, out, lse, alibi = ctx.saved_tensors
        if gout is None:
            gout = torch.zeros_like(out)
        if out.dtype in (torch.float16, torch.bfloat16):
            # delta from the unrounded fp32 output (see attention's backward).
            out = lib.varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, *ctx.args, alibi)[0]
        dq, dk, dv = lib.varlen_attention_backward(gout, q, k, v, cu_q, cu_k, out, lse, *ctx.args, alibi)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::varlen_attention", backward, setup_context=setup)


# --------------------------------------------------------------------------- samples
def _packed(lens_q, lens_k, hq, hk, d, dv, device, dtype, g, requires_grad):
    def mk(t, h, dd):
        return torch.randn(t, h, dd, generator=g).to(device, dtype).requires_grad_(requires_grad)

    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return mk(sum(lens_q), hq, d), mk(sum(lens_k), hk, d), mk(sum(lens_k), hk, dv), cu_q, cu_k


def samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(6)
    out = []
    lens = [1, 7, 97, 33, 2]
    q, k, v, cq, ck = _packed(lens, lens, 4, 2, 64, 64, device, dtype, g, requires_grad)
    out.append(Sample((q, k, v, cq, ck, max(lens), max(lens)), dict(causal=True), desc="GQA causal self-attention"))
    out.append(Sample((q, k, v, cq, ck, max(lens), max(lens)), desc="GQA, no mask"))
    lq, lk = [1, 5, 3], [40, 5, 9]
    q, k, v, cq, ck = _packed(lq, lk, 2, 2, 32, 16, device, dtype, g, requires_grad)
    out.append(Sample((q, k, v, cq, ck, 5, 40), dict(causal=True, window_size=(6, 0)),
                      desc="decode-like Lq < Lk, causal + window, Dv != D"))
    out.append(Sample((q, k, v, cq, ck, 5, 40), dict(causal=True, alibi_slopes=torch.rand(3, 2, generator=g).to(device)),
                      desc="ALiBi [B, H], causal, Lq < Lk"))
    return out


def native_samples():
    g = torch.Generator().manual_seed(0)
    q, k, v, cq, ck = _packed([3, 1, 4], [3, 1, 4], 2, 1, 8, 8, "cpu", torch.float32, g, True)
    out, lse = torch.ops.pyllm.varlen_attention(q.detach(), k.detach(), v.detach(), cq, ck, 0.35, True, -1, -1, 0.0, 0)
    return {
        "varlen_attention": [(q, k, v, cq, ck, 0.35, True, -1, -1, 0.0, 0),
                             (q, k, v, cq.long(), ck.long(), 0.35, False, 1, 1, 0.0, 0),
                             (q, k, v, cq, ck, 0.35, True, -1, -1, 0.0, 0, torch.tensor([0.5, 0.25]))],
        "varlen_attention_backward": [(torch.randn(out.shape), q.detach(), k.detach(), v.detach(), cq, ck, out, lse,
                                       0.35, True, -1, -1, 0.0, 0)],
    }


def bad_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, cq, ck = _packed([3, 2], [3, 2], 2, 2, 8, 8, "cpu", torch.float32, g, False)
    f = varlen_attention
    return [
        BadInput(lambda: f(q, k, v, cq.float(), ck, 3, 3), TypeError, "cu_seqlens_q must be a non-empty 1-D int32 or int64",
                 "cu_seqlens dtype"),
        BadInput(lambda: f(q, k, v, cq.view(1, -1), ck, 3, 3), TypeError, "cu_seqlens_q must be a non-empty 1-D",
                 "cu_seqlens rank"),
        BadInput(lambda: f(q, k, v, cq + 1, ck, 3, 3), ValueError, "cu_seqlens_q must start at 0", "start"),
        BadInput(lambda: f(q, k, v, torch.tensor([0, 4, 3, 5], dtype=torch.int32),
                           torch.tensor([0, 2, 3, 5], dtype=torch.int32), 4, 3), ValueError,
                 "cu_seqlens_q must not decrease", "decreasing"),
        BadInput(lambda: f(q, k, v, torch.tensor([0, 3, 4], dtype=torch.int32), ck, 3, 3), ValueError,
                 r"cu_seqlens_q must end at the number of packed tokens of q \(5\), got 4", "last entry"),
        BadInput(lambda: f(q, k, v, cq, ck, 2, 3), ValueError, r"max_seqlen_q \(2\) is smaller than the longest "
                 r"sequence \(3\)", "max_seqlen"),
        BadInput(lambda: f(q, k[:, :1].repeat(1, 3, 1)[:, :3], v[:, :1].repeat(1, 3, 1)[:, :3], cq, ck, 3, 3),
                 ValueError, r"q heads \(2\) must be a multiple of k/v heads \(3\)", "heads"),
        BadInput(lambda: f(q, k, v, cq, ck.to("meta"), 3, 3), ValueError, "cu_seqlens_k is on meta but q is on cpu",
                 "devices"),
        BadInput(lambda: f(q.unsqueeze(0), k, v, cq, ck, 3, 3), ValueError, r"packed as \[total_tokens, heads, head_dim\]",
                 "rank"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, alibi_slopes=torch.ones(3)), ValueError,
                 r"alibi_slopes must have shape \[2\] or \[2, 2\]", "alibi shape"),
        BadInput(lambda: f(q, k, v, torch.tensor(0, dtype=torch.int32), ck, 3, 3), TypeError,
                 r"cu_seqlens_q must be a non-empty 1-D int32 or int64 tensor, got shape \[\]", "0-dim cu_seqlens"),
        BadInput(lambda: f(q, k, v, cq, torch.tensor([0, 5], dtype=torch.int32), 3, 5), ValueError,
                 r"cu_seqlens_q and cu_seqlens_k must have the same length \(batch \+ 1\), got 3 and 2", "batch sizes"),
        BadInput(lambda: f(q, k, v, cq, ck, "3", 3), TypeError, "max_seqlen_q must be an int, got str",
                 "max_seqlen str"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, True), TypeError, r"max_seqlen_k must be an int, got a bool",
                 "max_seqlen bool"),
        BadInput(lambda: f(q[:0], k[:0], v[:0], cq[:1], ck[:1], -1, 0), ValueError, "max_seqlen_q must be >= 0, got -1",
                 "max_seqlen negative"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, window_size=(True, -1)), TypeError,
                 r"window_size must be a \(left, right\) pair of ints", "window bool"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, window_size=(2, -3)), ValueError,
                 r"window_size right width must be -1 \(unbounded\) or >= 0, got -3", "window negative"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, None), TypeError, "dropout_p must be a Python number, got NoneType",
                 "dropout None"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, softmax_scale=float("inf")), ValueError,
                 "softmax_scale must be a finite number, got inf", "scale inf"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, causal="no"), TypeError, "causal must be a bool, got str",
                 "causal str"),
        BadInput(lambda: f(q, k, v, cq, ck, 3, 3, alibi_slopes=torch.ones(2, dtype=torch.int64)), TypeError,
                 "alibi_slopes must be a floating tensor", "alibi dtype"),
        BadInput(lambda: f(q[..., :0], k[..., :0], v, cq, ck, 3, 3), ValueError,
                 r"head dim is 0, so the default softmax_scale", "head dim 0"),
        BadInput(lambda: f(q, k.half(), v, cq, ck, 3, 3), TypeError, "k must have q's dtype torch.float32", "k dtype"),
        BadInput(lambda: pad_input(q, torch.tensor([0, 1, 2, 3, 99]), 2, 4), ValueError,
                 r"indices must be in \[0, batch \* seqlen\) = \[0, 8\), got values from 0 to 99", "pad_input range"),
        BadInput(lambda: pad_input(q, torch.tensor([0, 1, 2, 3, -1]), 2, 4), ValueError,
                 r"got values from -1 to 3", "pad_input negative index"),
        BadInput(lambda: pad_input(q, torch.arange(5.0), 2, 4), TypeError,
                 "indices must be an int64 or int32 tensor", "pad_input float indices"),
        BadInput(lambda: pad_input(q, torch.arange(5), "2", 4), TypeError, "batch must be an int, got str",
                 "pad_input batch str"),
        BadInput(lambda: unpad_input(torch.randn(2, 4, 8), torch.ones(4)), ValueError,
                 r"attention_mask must have shape \[batch, seqlen\] = \[2, 4\]", "unpad_input mask shape"),
    ]


def bench_cases(dtype, device, quick):
    """Mixed-length batch (MiniLM-like heads): packed varlen vs SDPA on the padded batch."""
    g = torch.Generator().manual_seed(0)
    b, h, d, lmax = (4, 2, 16, 32) if quick else (32, 12, 32, 128)
    lens = torch.randint(lmax // 4, lmax + 1, (b,), generator=g)
    lens[0] = lmax
    q, k, v, cq, ck = _packed(lens.tolist(), lens.tolist(), h, h, d, d, device, dtype, g, False)
    keep = torch.arange(lmax)[None, :] < lens[:, None]
    idx = keep.flatten().nonzero().flatten()

    def padded(t):
        return pad_input(t, idx, b, lmax).transpose(1, 2)

    qp, kp, vp = padded(q), padded(k), padded(v)
    mask = keep[:, None, None, :].to(device)
    es = q.element_size()
    return [BenchCase("varlen_attention", "mixed lengths (packed vs padded)", f"B{b} H{h} Lmax{lmax} D{d}", dtype,
                      lambda: varlen_attention(q, k, v, cq, ck, lmax, lmax),
                      {"F.sdpa on the padded batch": lambda: TF.scaled_dot_product_attention(
                          qp, kp, vp, attn_mask=mask).transpose(1, 2).flatten(0, 1)[idx]},
                      bytes=4 * q.numel() * es, flops=4.0 * h * d * float((lens.double() ** 2).sum()),
                      tol=1e-4 if dtype == torch.float32 else 5e-2)]


register(OpSpec(
    name="varlen_attention", functional=varlen_attention, reference=reference,
    torch_baseline=torch_varlen_attention, schemas=SCHEMAS, register=_register, native_samples=native_samples,
    samples=samples, bad_inputs=bad_inputs, bench_cases=bench_cases, limits=LIMITS,
    kernels=("csrc/cpu/attention.cpp", "csrc/cuda/attention.cu", "csrc/include/pyllm/varlen.h")))
