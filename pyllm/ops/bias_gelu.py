"""Fused bias + GELU (the intermediate activation of BERT/GPT-2 feed-forward layers): one slice.

``bias_gelu(input, bias, approximate)`` is ``F.gelu(input + bias, approximate=approximate)``
computed in one pass in fp32 (the sum is not rounded to the input dtype first, so half
inputs are slightly more accurate than torch's two-op chain). Kernels: csrc/cpu/bias_gelu.cpp,
csrc/cuda/bias_gelu.cu; GELU itself is csrc/include/pyllm/gelu.h.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as TF

from .. import backends
from . import BadInput, BenchCase, Limits, OpSpec, Sample, register
from ._common import check_float, check_same_device, empty, fmt_shape, run

LIMITS = Limits(notes="any shape; bias broadcast over the last dim")
APPROXIMATIONS = ("none", "tanh")


def reference(input, bias=None, approximate="none"):
    """gelu(input + bias) in fp32 (fp64 for fp64 input), returned in the input's dtype."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    z = input.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    y = TF.gelu(z, approximate=approximate)
    # Above 10, gelu(z) = z in fp32 and fp64 (Phi(10) = 1 - 8e-24). Some torch CPU builds' vectorized
    # fp32 erf GELU (AVX-512, torch 2.14.1) give NaN at +inf and inf for z > ~1.7e38 (0.5 * z * 2
    # overflows); this keeps the reference exact there on every CPU.
    return torch.where(z > 10, z, y).to(input.dtype)


def bias_gelu(input: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(input + bias, approximate=approximate)`` in one pass; ``bias`` has shape
    ``[input.shape[-1]]`` (or is None). ``approximate``: ``"none"`` (erf) or ``"tanh"``."""
    check_float(input, "input")
    if input.dim() == 0:
        raise ValueError("pyllm: input must have at least 1 dimension, got a scalar")
    if bias is not None:
        check_float(bias, "bias")
        check_same_device(bias, "bias", input)
        if tuple(bias.shape) != (input.shape[-1],):
            raise ValueError(f"pyllm: bias must have shape [{input.shape[-1]}] (input's last dim), "
                             f"got {list(bias.shape)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"pyllm: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    d = backends.select("bias_gelu", (input, bias), LIMITS)
    if d.uses_kernel:
        return run(d.ns.bias_gelu, (input, bias), input, bias, approximate == "tanh")
    return reference(input, bias, approximate)


def torch_bias_gelu(input, bias=None, approximate="none"):
    """The plain torch baseline: ``F.gelu(input + bias, approximate=...)``."""
    return TF.gelu(input if bias is None else input + bias, approximate=approximate)


SCHEMAS = {
    "bias_gelu": "(Tensor input, Tensor? bias, bool tanh) -> Tensor",
    "bias_gelu_backward": "(Tensor grad_out, Tensor input, Tensor? bias, bool tanh) -> Tensor",
}


def _register(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::bias_gelu")
    def _(x, bias, tanh):
        return empty(x.shape, x)

    @torch.library.register_fake(f"{ns}::bias_gelu_backward")
    def _(grad_out, x, bias, tanh):
        return empty(x.shape, x)

    def setup(ctx, inputs, output):
        x, bias, tanh = inputs
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh

    def backward(ctx, gy):
        x, bias = ctx.saved_tensors
        dx = lib.bias_gelu_backward(gy, x, bias, ctx.tanh)
        db = None
        if bias is not None and ctx.needs_input_grad[1]:
            # explicit row count: reshape(-1, 0) of an empty gradient (last dim 0) is ambiguous
            db = dx.float().reshape(math.prod(dx.shape[:-1]), dx.shape[-1]).sum(0).to(bias.dtype)
        return dx, db, None

    torch.library.register_autograd(f"{ns}::bias_gelu", backward, setup_context=setup)


def samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(5)

    def rand(*s, scale=3.0):
        return (torch.randn(s, generator=g) * scale).to(device, dtype).requires_grad_(requires_grad)

    out = []
    for n, approx in ((1, "none"), (7, "tanh"), (97, "none"), (1023, "tanh"), (4097, "none")):
        out.append(Sample((rand(3, 5, n), rand(n), approx), desc=f"[3,5,{n}] {approx}"))
    x = torch.randn(6, 8, generator=g).to(device, dtype)
    out.append(Sample((x.t().detach().requires_grad_(requires_grad), None, "tanh"), desc="strided, no bias"))
    return out


def native_samples():
    g = dict(requires_grad=True)
    return {
        "bias_gelu": [(torch.randn(3, 7, **g), torch.randn(7, **g), False),
                      (torch.randn(2, 3, 5).bfloat16().requires_grad_(), None, True)],
        "bias_gelu_backward": [(torch.randn(3, 7), torch.randn(3, 7), torch.randn(7), False),
                               (torch.randn(2, 5).half(), torch.randn(2, 5).half(), None, True)],
    }


def bad_inputs():
    x = torch.randn(2, 8)
    return [
        BadInput(lambda: bias_gelu(x, torch.randn(7)), ValueError, r"bias must have shape \[8\]", "bias shape"),
        BadInput(lambda: bias_gelu(x, torch.randn(2, 8)), ValueError, r"bias must have shape \[8\]",
                 "no silent broadcast"),
        BadInput(lambda: bias_gelu(x, None, "erf"), ValueError, "approximate must be one of", "approximate"),
        BadInput(lambda: bias_gelu(x.int()), TypeError, "input must be a floating tensor", "dtype"),
        BadInput(lambda: bias_gelu(x, torch.randn(8, device="meta")), ValueError,
                 "bias is on meta but input is on cpu", "device"),
        BadInput(lambda: bias_gelu(torch.tensor(1.0)), ValueError, "input must have at least 1 dimension", "scalar"),
        BadInput(lambda: bias_gelu(x, torch.tensor(1.0)), ValueError, r"bias must have shape \[8\].*got \[\]",
                 "0-dim bias"),
        BadInput(lambda: bias_gelu(x, [0.0] * 8), TypeError, "bias must be a torch.Tensor, got list", "bias list"),
        BadInput(lambda: bias_gelu(x, torch.ones(8, dtype=torch.int64)), TypeError, "bias must be a floating tensor",
                 "bias dtype"),
    ]


def bench_cases(dtype, device, quick):
    g = torch.Generator().manual_seed(0)
    n, d = (64, 96) if quick else (8 * 128, 3072)  # BERT-base intermediate: 8 x 128 tokens x 3072
    x = torch.randn(n, d, generator=g).to(device, dtype)
    b = torch.randn(d, generator=g).to(device, dtype)
    eager = "F.gelu(x + b)"
    return [BenchCase("bias_gelu", f"bias+gelu {approx}", fmt_shape((n, d)), dtype,
                      (lambda a=approx: bias_gelu(x, b, a)),
                      {eager: (lambda a=approx: TF.gelu(x + b, approximate=a))},
                      bytes=2 * x.numel() * x.element_size() + d * b.element_size(),
                      tol=1e-5 if dtype == torch.float32 else 2e-2)
            for approx in APPROXIMATIONS]


register(OpSpec(
    name="bias_gelu", functional=bias_gelu, reference=reference, torch_baseline=torch_bias_gelu,
    schemas=SCHEMAS, register=_register, native_samples=native_samples, samples=samples,
    bad_inputs=bad_inputs, bench_cases=bench_cases, limits=LIMITS,
    kernels=("csrc/cpu/bias_gelu.cpp", "csrc/cuda/bias_gelu.cu")))
