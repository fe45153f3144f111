"""RMSNorm (torch's, and the casting of Llama, T5 and Gemma), and residual add + RMSNorm: one slice.

Kernels: csrc/cpu/norm.cpp, csrc/cuda/norm.cu (``rms_norm``, ``add_rms_norm``, ``rms_norm_backward``;
add_rms_norm's backward is rms_norm_backward of the sum plus the sum's own gradient).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as TF

from .. import backends
from . import BadInput, BenchCase, Limits, OpSpec, Sample, register
from ._common import (check_eps, check_float, check_param, check_residual, empty, external_norm_baselines, flat,
                      flat_param, fmt_shape, normalized, param_grad, run)

STYLES = ("torch", "llama", "t5", "gemma")


def _limit_check(path, out_dtype):
    if out_dtype not in LIMITS.dtypes:
        return f"output dtype {str(out_dtype).replace('torch.', '')} has no kernel"
    return None


LIMITS = Limits(check=_limit_check, notes="any width; styles torch, llama, t5, gemma")
ADD_LIMITS = Limits(check=_limit_check, notes="any width; styles torch, llama, t5, gemma; residual of the input's "
                                              "shape and dtype")


# --------------------------------------------------------------------------- reference
def reference(x, weight=None, eps=1e-6, round_dtype=None, weight_offset=0.0, out_dtype=None):
    """RMSNorm over the last dim, generalized to cover torch's and Hugging Face's variants.

    n = x * rsqrt(mean(x^2) + eps) computed in fp32; if `round_dtype` is given, n is rounded
    to it (Llama rounds to the input dtype, T5 to a half weight's dtype); then
    y = n * (weight + weight_offset) in fp32 (Gemma uses offset 1), rounded to `out_dtype`.
    Returns (out, rstd).
    """
    xf = x if x.dtype == torch.float64 else x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    n = xf * rstd
    if round_dtype is not None:
        n = n.to(round_dtype).to(xf.dtype)
    if weight is not None:
        n = n * ((weight if weight.dtype == torch.float64 else weight.float()) + weight_offset)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return n.to(out_dtype or x.dtype), rstd.squeeze(-1).to(stat)


def add_reference(x, residual, weight=None, eps=1e-6, round_dtype=None, weight_offset=0.0, out_dtype=None):
    """``s = x + residual`` rounded to x's dtype, then :func:`reference` of ``s``.
    Returns (out, s, rstd)."""
    s = x + residual
    out, rstd = reference(s, weight, eps, round_dtype, weight_offset, out_dtype)
    return out, s, rstd


def style_args(style: str, x_dtype, w_dtype):
    """(round_dtype, weight_offset, out_dtype) reproducing each library's casting."""
    halves = (torch.float16, torch.bfloat16)
    if style == "torch":  # F.rms_norm: all fp32, cast once
        return None, 0.0, x_dtype
    if style == "llama":  # weight * normalized.to(input_dtype)
        out = torch.promote_types(w_dtype, x_dtype) if w_dtype is not None else x_dtype
        return (x_dtype if x_dtype in halves else None), 0.0, out
    if style == "t5":  # normalized.to(weight.dtype) if weight is half; weight * normalized
        if w_dtype in halves:
            return w_dtype, 0.0, w_dtype
        return None, 0.0, (torch.promote_types(w_dtype, torch.float32) if w_dtype is not None else torch.float32)
    if style == "gemma":  # (normalized * (1 + weight)).type_as(input), all fp32
        return None, 1.0, x_dtype
    raise ValueError(f"pyllm: style must be one of {STYLES}, got {style!r}")


# --------------------------------------------------------------------------- public wrapper
def rms_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, *,
             style: str = "torch") -> torch.Tensor:
    """RMS normalization over the trailing dims, as ``F.rms_norm`` (``style="torch"``).

    ``style`` reproduces other libraries' casting exactly: ``"llama"`` (Hugging Face
    LlamaRMSNorm/MistralRMSNorm: round the normalized value to the input dtype, then
    multiply by the weight), ``"t5"`` (T5LayerNorm: round to a half weight's dtype),
    ``"gemma"`` (multiply by ``1 + weight`` in fp32). ``eps=None`` means
    ``torch.finfo(float32).eps`` like torch.
    """
    check_float(input, "input")
    shape = normalized(input, normalized_shape)
    check_param(weight, "weight", input, shape)
    check_eps(eps, allow_none=True)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    _check_style(style)
    round_dtype, offset, out_dtype = style_args(style, input.dtype, None if weight is None else weight.dtype)
    x, w = flat(input, shape), flat_param(weight, shape)
    d = backends.select("rms_norm", (input, weight), LIMITS, (out_dtype,))
    if d.uses_kernel:
        out = run(d.ns.rms_norm, (input, weight), x, w, float(eps), round_dtype, float(offset), out_dtype)[0]
    else:
        out = reference(x, w, eps, round_dtype, offset, out_dtype)[0]
    return out.view(input.shape) if len(shape) > 1 else out


def _check_style(style):
    if not isinstance(style, str) or style not in STYLES:
        raise ValueError(f"pyllm: style must be one of {STYLES}, got {style!r}")


def add_rms_norm(input: torch.Tensor, residual: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
                 weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, *,
                 style: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns ``(rms_norm(input + residual), input + residual)``.

    The sum is rounded to the input dtype before normalizing, exactly like
    ``s = input + residual; rms_norm(s, ...)`` (a Llama-family decoder layer's
    ``hidden_states = residual + hidden_states`` followed by its RMSNorm), in one pass over memory.
    ``style`` and ``eps`` as :func:`rms_norm`.
    """
    check_float(input, "input")
    check_residual(residual, input)
    shape = normalized(input, normalized_shape)
    check_param(weight, "weight", input, shape)
    check_eps(eps, allow_none=True)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    _check_style(style)
    round_dtype, offset, out_dtype = style_args(style, input.dtype, None if weight is None else weight.dtype)
    x, r, w = flat(input, shape), flat(residual, shape), flat_param(weight, shape)
    d = backends.select("add_rms_norm", (input, residual, weight), ADD_LIMITS, (out_dtype,))
    if d.uses_kernel:
        out, summed = run(d.ns.add_rms_norm, (input, residual, weight), x, r, w, float(eps), round_dtype,
                          float(offset), out_dtype)[:2]
    else:
        out, summed = add_reference(x, r, w, eps, round_dtype, offset, out_dtype)[:2]
    if len(shape) > 1:
        out, summed = out.view(input.shape), summed.view(input.shape)
    return out, summed


def torch_add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, style="torch"):
    """The plain torch baseline: ``s = input + residual; (rms_norm baseline of s, s)``."""
    s = input + residual
    return torch_rms_norm(s, normalized_shape, weight, eps, style=style), s


def torch_rms_norm(input, normalized_shape, weight=None, eps=None, *, style="torch"):
    """The plain torch baseline: ``F.rms_norm``, or the Hugging Face module's formula for ``style``."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if style == "torch":
        return TF.rms_norm(input, shape, weight, eps)
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    dims = tuple(range(-len(shape), 0))
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    h = input.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if style == "llama":  # LlamaRMSNorm
        h = h.to(input.dtype)
        return h if weight is None else weight * h
    if style == "t5":  # T5LayerNorm
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(weight.dtype)
        return h if weight is None else weight * h
    if style == "gemma":  # GemmaRMSNorm
        out = h if weight is None else h * (1.0 + weight.to(acc))
        return out.type_as(input)
    raise ValueError(f"pyllm: style must be one of {STYLES}, got {style!r}")


# --------------------------------------------------------------------------- fakes + autograd
SCHEMAS = {
    "rms_norm": "(Tensor input, Tensor? weight, float eps, ScalarType? round_dtype, float weight_offset, "
                "ScalarType out_dtype) -> (Tensor, Tensor)",
    "rms_norm_backward": "(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, ScalarType? round_dtype, "
                         "float weight_offset) -> (Tensor, Tensor)",
}


def _register(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::rms_norm")
    def _(x, weight, eps, round_dtype, weight_offset, out_dtype):
        return empty(x.shape, x, out_dtype), empty(x.shape[:-1], x, torch.float32)

    @torch.library.register_fake(f"{ns}::rms_norm_backward")
    def _(grad_out, x, rstd, weight, round_dtype, weight_offset):
        return empty(x.shape, x), param_grad(x, weight)

    def setup(ctx, inputs, output):
        x, weight, eps, round_dtype, offset, out_dtype = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.round_dtype, ctx.offset = round_dtype, offset

    def backward(ctx, gy, _grstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = lib.rms_norm_backward(gy, x, rstd, weight, ctx.round_dtype, ctx.offset)
        return dx, dw if weight is not None else None, None, None, None, None

    torch.library.register_autograd(f"{ns}::rms_norm", backward, setup_context=setup)


ADD_SCHEMAS = {
    "add_rms_norm": "(Tensor input, Tensor residual, Tensor? weight, float eps, ScalarType? round_dtype, "
                    "float weight_offset, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)",
}


def _register_add(ns: str, lib) -> None:
    @torch.library.register_fake(f"{ns}::add_rms_norm")
    def _(x, residual, weight, eps, round_dtype, weight_offset, out_dtype):
        torch._check(residual.shape == x.shape, lambda: "residual must have the input's shape")
        return empty(x.shape, x, out_dtype), empty(x.shape, x), empty(x.shape[:-1], x, torch.float32)

    def setup(ctx, inputs, output):
        x, residual, weight, eps, round_dtype, offset, out_dtype = inputs
        ctx.save_for_backward(output[1], weight, output[2])
        ctx.round_dtype, ctx.offset = round_dtype, offset

    def backward(ctx, gy, gsummed, _grstd):
        summed, weight, rstd = ctx.saved_tensors
        if gy is None:
            ds, dw = None, None
        else:
            ds, dw = lib.rms_norm_backward(gy, summed, rstd, weight, ctx.round_dtype, ctx.offset)
        if gsummed is not None:
            ds = gsummed.to(summed.dtype) if ds is None else ds + gsummed.to(ds.dtype)
        if ds is None:
            ds = torch.zeros_like(summed)
        return ds, ds, dw if weight is not None else None, None, None, None, None

    torch.library.register_autograd(f"{ns}::add_rms_norm", backward, setup_context=setup)


# --------------------------------------------------------------------------- samples
def samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(2)

    def rand(*s):
        return torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    out = []
    for n in (1, 7, 97, 1023, 4097):
        out.append(Sample((rand(3, 5, n), n, rand(n), 1e-6), desc=f"[3,5,{n}] torch"))
    for style in STYLES:
        out.append(Sample((rand(4, 33), 33, rand(33), 1e-6), {"style": style}, desc=f"style {style}"))
    out.append(Sample((rand(2, 3, 8), (3, 8), None), desc="2-D shape, no weight, eps=None"))
    return out


def native_samples():
    g = dict(requires_grad=True)
    n = 7
    w = torch.randn(n, **g)
    x = torch.randn(3, n)
    rstd = torch.rsqrt(x.square().mean(-1) + 1e-6)
    return {
        "rms_norm": [(torch.randn(3, n, **g), w, 1e-6, None, 0.0, torch.float32),
                     (torch.randn(2, 3, n).bfloat16().requires_grad_(), torch.randn(n, **g), 1e-6,
                      torch.bfloat16, 0.0, torch.float32),
                     (torch.randn(2, n).half().requires_grad_(), w, 1e-6, None, 1.0, torch.float16)],
        "rms_norm_backward": [(torch.randn(3, n), x, rstd, w.detach(), None, 0.0),
                              (torch.randn(3, n), x, rstd, None, torch.float16, 1.0)],
    }


def add_samples(device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(3)

    def rand(*s):
        return torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    out = []
    for n in (1, 7, 97, 1023, 4097):
        out.append(Sample((rand(3, 5, n), rand(3, 5, n), n, rand(n), 1e-6), desc=f"[3,5,{n}] torch"))
    for style in STYLES:
        out.append(Sample((rand(4, 33), rand(4, 33), 33, rand(33), 1e-6), {"style": style}, desc=f"style {style}"))
    out.append(Sample((rand(2, 3, 8), rand(2, 3, 8), (3, 8), None), desc="2-D shape, no weight, eps=None"))
    return out


def add_native_samples():
    g = dict(requires_grad=True)
    n = 7
    return {"add_rms_norm": [
        (torch.randn(3, n, **g), torch.randn(3, n, **g), torch.randn(n, **g), 1e-6, None, 0.0, torch.float32),
        (torch.randn(2, 3, n).bfloat16().requires_grad_(), torch.randn(2, 3, n).bfloat16().requires_grad_(),
         torch.randn(n, **g), 1e-6, torch.bfloat16, 0.0, torch.float32),
        (torch.randn(2, n).half().requires_grad_(), torch.randn(2, n).half(), None, 1e-6, None, 1.0, torch.float16)]}


def add_bad_inputs():
    x = torch.randn(2, 8)
    return [
        BadInput(lambda: add_rms_norm(x, torch.randn(1, 8), 8), ValueError,
                 r"residual must have the input's shape \[2, 8\], got \[1, 8\]", "broadcast residual"),
        BadInput(lambda: add_rms_norm(x, x.double(), 8), TypeError, "residual must have the input's dtype",
                 "residual dtype"),
        BadInput(lambda: add_rms_norm(x, "r", 8), TypeError, "residual must be a torch.Tensor", "residual type"),
        BadInput(lambda: add_rms_norm(x, x, 8, style="mistral"), ValueError, "style must be one of", "style"),
        BadInput(lambda: add_rms_norm(x, x, 8, torch.ones(7)), ValueError, r"weight must have shape \[8\]",
                 "weight"),
        BadInput(lambda: add_rms_norm(x, x, 8, eps=-1.0), ValueError, "eps must be >= 0", "eps negative"),
        BadInput(lambda: add_rms_norm(x.int(), x.int(), 8), TypeError, "input must be a floating tensor", "dtype"),
    ]


def bad_inputs():
    x = torch.randn(2, 8)
    return [
        BadInput(lambda: rms_norm(x, 8, style="mistral"), ValueError, "style must be one of", "style"),
        BadInput(lambda: rms_norm(x, (2, 4)), ValueError, r"normalized_shape \[2, 4\] must match", "shape"),
        BadInput(lambda: rms_norm(x, 8, torch.ones(8, 1)), ValueError, r"weight must have shape \[8\]", "weight"),
        BadInput(lambda: rms_norm(x.int(), 8), TypeError, "input must be a floating tensor", "dtype"),
        BadInput(lambda: rms_norm(x, 8, eps=True), TypeError, "eps must be a Python number or None", "eps"),
        BadInput(lambda: rms_norm(x, 8, eps=-1e-6), ValueError, "eps must be >= 0, got -1e-06", "eps negative"),
        BadInput(lambda: rms_norm(x, 8, eps=float("nan")), ValueError, "eps must be a finite number, got nan",
                 "eps NaN"),
        BadInput(lambda: rms_norm(x, [8.0]), TypeError, r"normalized_shape must be an int or a sequence of ints",
                 "float dim"),
        BadInput(lambda: rms_norm(x, 8, style=None), ValueError, "style must be one of .*, got None", "style None"),
        BadInput(lambda: rms_norm(x, 8, torch.ones(8, dtype=torch.bool)), TypeError,
                 "weight must be a floating tensor", "bool weight"),
    ]


def bench_cases(dtype, device, quick):
    g = torch.Generator().manual_seed(0)
    n, d = (64, 128) if quick else (4096, 4096)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(d, generator=g).to(device=device, dtype=dtype)
    return [BenchCase("rms_norm", "rms", fmt_shape((n, d)), dtype, lambda: rms_norm(x, (d,), w, 1e-6),
                      {"F.rms_norm": lambda: TF.rms_norm(x, (d,), w, 1e-6),
                       **external_norm_baselines("rms_norm", x, w, None, 1e-6)},
                      bytes=(2 * n * d + d) * x.element_size(), tol=1e-4 if dtype == torch.float32 else 5e-2)]


def add_bench_cases(dtype, device, quick):
    g = torch.Generator().manual_seed(0)
    n, d = (64, 128) if quick else (4096, 4096)
    x, r = (torch.randn(n, d, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    w = torch.randn(d, generator=g).to(device=device, dtype=dtype)

    def eager():  # a Llama decoder layer: residual + hidden, then LlamaRMSNorm
        s = x + r
        return torch_rms_norm(s, (d,), w, 1e-6, style="llama"), s

    return [BenchCase("add_rms_norm", "residual+rms (llama)", fmt_shape((n, d)), dtype,
                      lambda: add_rms_norm(x, r, (d,), w, 1e-6, style="llama"), {"x + r; LlamaRMSNorm": eager},
                      bytes=(4 * n * d + d) * x.element_size(), tol=1e-4 if dtype == torch.float32 else 5e-2)]


register(OpSpec(
    name="rms_norm", functional=rms_norm, reference=reference, torch_baseline=torch_rms_norm,
    schemas=SCHEMAS, register=_register, native_samples=native_samples, samples=samples,
    bad_inputs=bad_inputs, bench_cases=bench_cases, limits=LIMITS,
    kernels=("csrc/cpu/norm.cpp", "csrc/cuda/norm.cu")))
register(OpSpec(
    name="add_rms_norm", functional=add_rms_norm, reference=add_reference, torch_baseline=torch_add_rms_norm,
    schemas=ADD_SCHEMAS, register=_register_add, native_samples=add_native_samples, samples=add_samples,
    bad_inputs=add_bad_inputs, bench_cases=add_bench_cases, limits=ADD_LIMITS,
    kernels=("csrc/cpu/norm.cpp", "csrc/cuda/norm.cu")))
