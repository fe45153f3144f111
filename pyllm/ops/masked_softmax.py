"""Scale + mask + softmax in one pass: one slice.

Kernels: csrc/cpu/softmax.cpp, csrc/cuda/softmax.cu (``masked_softmax``,
``masked_softmax_backward``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from . import BadInput, BenchCase, Limits, OpSpec, Sample, register
from ._common import check_finite, check_flag, check_float, check_mask, empty, fmt_shape, run

LIMITS = Limits(notes="any length; bool or additive masks of any broadcast shape and strides")


# --------------------------------------------------------------------------- reference
def causal_keep(lq: int, lk: int, device=None, alignment: str = "top_left") -> torch.Tensor:
    """Bool [lq, lk] keep-mask. top_left: key j visible to query i if j <= i (SDPA's
    is_causal); bottom_right: if j <= i + (lk - lq) (decoding with a KV cache)."""
    i = torch.arange(lq, device=device).unsqueeze(-1)
    j = torch.arange(lk, device=device)
    shift = 0 if alignment == "top_left" else lk - lq
    return j <= i + shift


def reference(x, mask=None, scale=1.0, causal=False):
    """softmax(x * scale + mask) over the last dim, in fp32, returned in x's dtype.

    mask: bool (True = keep) or additive float, broadcastable to x. causal=True hides
    keys after the query (top-left). Rows with no visible key give zeros, not NaN; a hidden
    position is 0 even in a row that holds a NaN.
    """
    if x.shape[-1] == 0:  # no keys: nothing to normalize (amax over an empty dim fails)
        return torch.empty_like(x)
    s = (x if x.dtype == torch.float64 else x.float()) * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + (mask if mask.dtype == torch.float64 else mask.float())
    if causal:
        c = causal_keep(x.shape[-2], x.shape[-1], x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # A hidden position (score -inf: a bool mask, causal, an additive -inf) is a constant 0, in a
    # row holding a NaN too, and no gradient reaches it or comes from it (pyllm's non-finite rule,
    # docs/RELIABILITY.md). A row whose keys are all masked gives zeros; it is softmaxed as zeros and
    # then cleared, so neither the output nor its gradient is NaN. NaN scores stay NaN.
    hidden = (s == float("-inf")).detach()
    s = s.masked_fill(hidden, float("-inf"))
    dead = hidden.all(-1, keepdim=True)
    p = torch.softmax(torch.where(dead, torch.zeros_like(s), s), -1)
    p = p.masked_fill(hidden, 0.0)
    return p.to(x.dtype)


# --------------------------------------------------------------------------- public wrapper
def masked_softmax(input: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0,
                   causal: bool = False) -> torch.Tensor:
    """``softmax(input * scale + mask)`` over the last dim, in one pass.

    ``mask``: bool (True = keep, as SDPA) or an additive float mask, broadcastable to
    ``input`` with any strides (never materialized). ``causal=True`` hides keys after the
    query (top-left alignment, as SDPA's ``is_causal``; query index = ``input``'s dim -2).
    A row with every key masked gives zeros, never NaN. No length limits.
    """
    check_float(input, "input")
    if input.dim() == 0:
        raise ValueError("pyllm: input must have at least 1 dimension, got a scalar")
    check_flag(causal, "causal")
    if causal and input.dim() < 2:
        raise ValueError(f"pyllm: causal=True needs input with at least 2 dims [..., Lq, Lk], "
                         f"got shape {list(input.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"pyllm: scale must be a Python number, got {type(scale).__name__}")
    check_finite(scale, "scale")
    if mask is not None:
        check_mask(mask, "mask", "keep", input, "input", input.shape, "input of shape")
    additive = mask if (mask is not None and mask.dtype != torch.bool) else None
    d = backends.select("masked_softmax", (input, mask), LIMITS, typed=(input, additive))
    if d.uses_kernel:
        return run(d.ns.masked_softmax, (input, mask), input, mask, float(scale), bool(causal))
    return reference(input, mask, scale, causal)


def torch_masked_softmax(input, mask=None, scale=1.0, causal=False):
    """The plain torch baseline: ``(input * scale + mask).masked_fill(...).softmax(-1)`` in the
    input's dtype, with rows whose keys are all masked set to zero (torch gives NaN there)."""
    s = input * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + mask.to(input.dtype)
    if causal:
        c = torch.ones(input.shape[-2], input.shape[-1], dtype=torch.bool, device=input.device).tril()
        keep = c if keep is None else keep & c
    if keep is None:
        return torch.softmax(s, -1)
    keep = keep.expand(s.shape)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return torch.where(keep.any(-1, keepdim=True), p, torch.zeros_like(p))


# --------------------------------------------------------------------------- fakes + autograd
SCHEMAS = {
    "masked_softmax": "(Tensor input, Tensor? mask, float scale, bool causal) -> Tensor",
    "masked_softmax_backward": "(Tensor grad_out, Tensor out, float scale) -> Tensor",
}


def _register(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::masked_softmax")
    def _(x, mask, scale, causal):
        return empty(x.shape, x)

    @torch.library.register_fake(f"{ns}::masked_softmax_backward")
    def _(grad_out, out, scale):
        return empty(out.shape, out)

    def setup(ctx, inputs, output):
        x, mask, scale, causal = inputs
        ctx.save_for_backward(output)
        ctx.scale = scale
        ctx.mask_meta = None if mask is None else (mask.shape, mask.dtype)

    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        dx = lib.masked_softmax_backward(gy, y, ctx.scale)
        dmask = None
        if ctx.needs_input_grad[1] and ctx.mask_meta is not None:
            shape, dtype = ctx.mask_meta
            # d(scores)/d(mask) = 1: the unscaled softmax gradient, reduced over broadcast dims.
            dmask = lib.masked_softmax_backward(gy, y, 1.0).sum_to_size(shape).to(dtype)
        return dx, dmask, None, None

    torch.library.register_autograd(f"{ns}::masked_softmax", backward, setup_context=setup)


# --------------------------------------------------------------------------- samples
def samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (1, 7, 97, 1023, 4097):
        x = torch.randn(2, 3, 5, n, generator=g).to(device, dtype).requires_grad_(requires_grad)
        keep = torch.rand(2, 1, 1, n, generator=g) > 0.3
        keep[1] = False  # a fully masked batch row: zeros, not NaN
        bias = torch.randn(1, 3, 5, n, generator=g).to(device, dtype)
        out.append(Sample((x, keep.to(device), 0.5, False), desc=f"n={n} bool mask, fully masked rows"))
        out.append(Sample((x, bias, 1.0, True), desc=f"n={n} additive mask, causal"))
        out.append(Sample((x, None, 2.0, True), desc=f"n={n} causal only"))
    x = torch.randn(3, 4, 9, generator=g).to(device, dtype)
    out.append(Sample((x.transpose(-1, -2).detach().requires_grad_(requires_grad), None, 1.0, False),
                      desc="strided last dim"))
    return out


def native_samples():
    g = dict(requires_grad=True)
    s = torch.randn(2, 2, 3, 5, **g)
    y = torch.randn(2, 3, 5).softmax(-1)
    return {
        "masked_softmax": [(s, torch.rand(2, 1, 1, 5) < 0.7, 0.5, False),
                           (s, torch.randn(1, 2, 3, 5, **g), 1.0, True),
                           (torch.randn(4, 6).half().requires_grad_(), None, 2.0, False)],
        "masked_softmax_backward": [(torch.randn(2, 3, 5), y, 0.5), (torch.randn(2, 3, 5).half(), y.half(), 1.0)],
    }


def bad_inputs():
    x = torch.randn(2, 3, 4)
    return [
        BadInput(lambda: masked_softmax(x, torch.ones(3, 3, dtype=torch.bool)), ValueError,
                 r"mask of shape \[3, 3\] is not broadcastable to input of shape \[2, 3, 4\]", "broadcast"),
        BadInput(lambda: masked_softmax(x, torch.ones(4, dtype=torch.int64)), TypeError,
                 "mask must be bool", "mask dtype"),
        BadInput(lambda: masked_softmax(x, None, "0.5"), TypeError, "scale must be a Python number", "scale"),
        BadInput(lambda: masked_softmax(torch.randn(4), None, 1.0, True), ValueError,
                 r"causal=True needs input with at least 2 dims", "causal rank"),
        BadInput(lambda: masked_softmax(torch.tensor(1.0)), ValueError, "at least 1 dimension", "scalar"),
        BadInput(lambda: masked_softmax(x, torch.ones(4, dtype=torch.bool, device="meta")), ValueError,
                 "mask is on meta but input is on cpu", "device"),
        BadInput(lambda: masked_softmax(x, None, float("nan")), ValueError, "scale must be a finite number, got nan",
                 "scale NaN"),
        BadInput(lambda: masked_softmax(x, None, float("-inf")), ValueError, "scale must be a finite number, got -inf",
                 "scale inf"),
        BadInput(lambda: masked_softmax(x, None, 1.0, "yes"), TypeError, "causal must be a bool, got str 'yes'",
                 "causal str"),
        BadInput(lambda: masked_softmax(x, None, 1.0, None), TypeError, "causal must be a bool, got NoneType",
                 "causal None"),
    ]


def padding_keep(b: int, lk: int, device, g) -> torch.Tensor:
    """Bool [b, 1, 1, lk] keep-mask: each sequence keeps a random prefix of >= lk/2 keys."""
    lengths = torch.randint(max(1, lk // 2), lk + 1, (b,), generator=g)
    keep = torch.arange(lk)[None, :] < lengths[:, None]
    return keep[:, None, None, :].to(device)


def bench_cases(dtype, device, quick):
    g = torch.Generator().manual_seed(0)
    b, h, lq, lk = (2, 2, 16, 33) if quick else (8, 12, 512, 512)
    x = torch.randn(b, h, lq, lk, generator=g).to(device=device, dtype=dtype)
    mask = padding_keep(b, lk, device, g)
    scale = 0.125
    eager = "eager scale+masked_fill+softmax"
    return [BenchCase("masked_softmax", "padding mask", fmt_shape(x.shape) + " mask " + fmt_shape(mask.shape),
                      dtype, lambda: masked_softmax(x, mask, scale),
                      {eager: lambda: (x * scale).masked_fill(~mask, float("-inf")).softmax(-1),
                       "torch.softmax (no mask, floor)": lambda: torch.softmax(x, -1)},
                      bytes=2 * x.numel() * x.element_size() + mask.numel(),
                      tol=1e-5 if dtype == torch.float32 else 1e-2, targets={eager: 3.0})]


register(OpSpec(
    name="masked_softmax", functional=masked_softmax, reference=reference,
    torch_baseline=torch_masked_softmax, schemas=SCHEMAS, register=_register,
    native_samples=native_samples, samples=samples, bad_inputs=bad_inputs, bench_cases=bench_cases,
    limits=LIMITS, kernels=("csrc/cpu/softmax.cpp", "csrc/cuda/softmax.cu")))
