"""The accuracy rule and the torch oracles shared by pyllm's test suites (tests/) and its fuzzer
(``python -m pyllm fuzz``, :mod:`pyllm.tools.fuzz`).

The rule is FlashAttention's: a kernel's error against a high-precision reference must be
at most a small multiple of the error plain PyTorch makes in the *same* dtype against
that reference, plus an honest floor for the cases where PyTorch happens to be exact:

    max|out - ref| <= max(mult * max|torch_out - ref|, floor * max|ref|)

with mult = 2 for outputs and 3 for gradients. ``ref`` is the fp64 oracle: a torch (or Hugging
Face) composition evaluated on fp64 copies of the inputs, never pyllm's own reference; the
baseline ``torch_out`` is the same composition in the test dtype. The floor is a few ulps of the
dtype at the reference's largest magnitude (FLOORS), so large gradients (weight grads summed
over many rows) and small outputs (softmax probabilities over 20000 keys, attention outputs
averaging many values) are both judged on their own scale; a floor of "an ulp at 1.0" would let
an all-zero answer pass wherever the reference is smaller than that ulp.

The torch compositions shared by the op suites (the oracles in fp64, the baselines in the test
dtype) are below: ``keep_mask`` (causal / sliding-window geometry from torch.tril/triu),
``softmax_torch``, ``attention_torch`` and ``rms_norm_torch`` (F.rms_norm or the Hugging Face
RMSNorm modules' code).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Default floors, relative to max|ref|: about one ulp of the dtype (8 for fp32) at the
# reference's largest value.
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,   # ~8 ulp (2^-23 each)
    torch.float16: 1e-3,   # ~1 ulp (2^-10)
    torch.bfloat16: 8e-3,  # ~1 ulp (2^-7)
}


def floor_for(dtype: torch.dtype) -> float:
    return FLOORS[dtype]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 over entries where both are finite (inf/nan placement is checked
    separately by assert_close_to_ref; a baseline's NaN, e.g. eager softmax on a fully
    masked row, does not count as error)."""
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.numel() == 0:
        return 0.0
    fin = torch.isfinite(b64) & torch.isfinite(a64)
    d = (a64 - b64)[fin].abs()
    return d.max().item() if d.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, torch_out: Optional[torch.Tensor],
                        mult: float = 2.0, floor: Optional[float] = None, name: str = "output",
                        check_dtype: bool = True) -> tuple[float, float]:
    """FlashAttention-style check of `out` against the fp64 reference `ref`.

    `torch_out` is plain PyTorch's result in the same dtype as `out` (the baseline), or None
    to judge by the floor alone. `floor` defaults to FLOORS[out.dtype] and is relative to
    max|ref| (a reference of exact zeros demands exact zeros). Also checks shape,
    dtype (against `torch_out`) and that non-finite values sit exactly where the reference
    has them. Returns (err, baseline_err) for callers that want to report them.
    """
    assert isinstance(out, torch.Tensor), f"{name}: expected a tensor, got {type(out).__name__}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if torch_out is not None:
        assert torch_out.shape == ref.shape, f"{name}: baseline shape {tuple(torch_out.shape)}"
        if check_dtype:
            assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != torch's {torch_out.dtype}"
    o64, r64 = out.detach().double(), ref.detach().double()
    assert torch.equal(torch.isnan(o64), torch.isnan(r64)), (
        f"{name}: NaN placement differs from the reference "
        f"({int(torch.isnan(o64).sum())} NaN in output, {int(torch.isnan(r64).sum())} in reference)")
    inf_o, inf_r = torch.isinf(o64), torch.isinf(r64)
    assert torch.equal(inf_o, inf_r) and torch.equal(o64[inf_o], r64[inf_r]), f"{name}: inf placement differs"
    err = max_abs_err(out, ref)
    base = max_abs_err(torch_out, ref) if torch_out is not None else 0.0
    if floor is None:
        floor = FLOORS[out.dtype]
    fin = r64[torch.isfinite(r64)]
    scale = fin.abs().max().item() if fin.numel() else 0.0
    tol = max(mult * base, floor * scale)
    assert err <= tol, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds {tol:.3e} "
        f"(= max({mult} x torch's error {base:.3e}, floor {floor:.1e} x max|ref| {scale:.3g})); dtype {out.dtype}")
    return err, base


def assert_grads_close(grads, ref_grads, torch_grads, mult: float = 3.0, names=None, floor=None):
    """assert_close_to_ref over matching lists of gradients (None entries must agree)."""
    names = names or [f"grad[{i}]" for i in range(len(grads))]
    for g, r, t, n in zip(grads, ref_grads, torch_grads, names):
        if r is None:
            assert g is None, f"{n}: expected no gradient, got one"
            continue
        assert g is not None, f"{n}: gradient missing"
        assert_close_to_ref(g, r, t, mult=mult, floor=floor, name=n)


def to64(*tensors):
    """Detached fp64 copies (None passes through), requiring grad if the source did."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().double()
        if t.requires_grad:
            c.requires_grad_(True)
        out.append(c)
    return out


def grads_of(loss: torch.Tensor, inputs):
    """Gradients of `loss` w.r.t. `inputs` (None entries, and inputs not requiring grad, give None)."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad(loss, live, allow_unused=True)) if live else iter(())
    return [next(gs) if (t is not None and t.requires_grad) else None for t in inputs]



def check_op_samples(spec, device, dtype: torch.dtype, check_path=None) -> int:
    """Runs every sample of a registered op (``pyllm.ops.specs()``) on ``device`` in ``dtype``:
    outputs against the op's torch composition on fp64 copies (the oracle), judged by the rule
    above against the same composition in ``dtype`` (the baseline); gradients of the first output
    likewise (3x) where the sample asks for them. ``check_path(spec)`` runs after each call (e.g.
    to assert which kernel ran). Returns the number of samples. Used by the device suite
    (tests/test_device.py) and ``python -m pyllm selftest``."""
    def cast(t, to64):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        c = t.detach().cpu().double() if to64 else t.detach().clone()
        return c.requires_grad_(t.requires_grad)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    samples = spec.samples(device, dtype, requires_grad=True)
    for sample in samples:
        args, kwargs = sample.args, sample.kwargs
        out = spec.functional(*args, **kwargs)
        if check_path is not None:
            check_path(spec)
        args64 = [cast(a, True) for a in args]
        argsb = [cast(a, False) for a in args]
        ref, base = spec.torch_baseline(*args64, **kwargs), spec.torch_baseline(*argsb, **kwargs)
        for i, (o, r, b) in enumerate(zip(as_tuple(out), as_tuple(ref), as_tuple(base))):
            assert_close_to_ref(o.detach().cpu(), r.detach(), b.detach().cpu(), name=f"{sample.desc} out[{i}]")
        leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if not leaves:
            continue
        y = first(out)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
        grads = torch.autograd.grad(y, [args[i] for i in leaves], dy)
        ref_grads = torch.autograd.grad(first(ref), [args64[i] for i in leaves], dy.cpu().double())
        base_grads = torch.autograd.grad(first(base), [argsb[i] for i in leaves], dy)
        assert_grads_close([g.cpu() for g in grads], ref_grads, [g.cpu() for g in base_grads],
                           names=[f"{sample.desc} grad[{i}]" for i in leaves])
    return len(samples)


# ----------------------------------------------------------------------------- torch oracles
# Each composition below runs in its inputs' dtype: on fp64 copies it is the oracle, in the test
# dtype the baseline. They use torch (and Hugging Face's formulas) only, never pyllm's code.
def keep_mask(lq: int, lk: int, causal: bool = False, alignment: str = "top_left", window=None,
              device=None) -> Optional[torch.Tensor]:
    """bool [lq, lk] (True = attend) from causality and a sliding window, or None for neither.

    Built from torch.tril / torch.triu: query i sits at key position p = i + shift (shift = 0
    for "top_left", lk - lq for "bottom_right"); causal keeps keys <= p; window (left, right)
    keeps keys in p - left .. p + right (-1 = unbounded on that side)."""
    if not causal and window is None:
        return None
    shift = 0 if alignment == "top_left" else lk - lq
    ones = torch.ones(lq, lk, dtype=torch.bool, device=device)
    keep = ones.tril(shift) if causal else ones
    if window is not None:
        left, right = window
        if left >= 0:
            keep = keep & ones.triu(shift - left)
        if right >= 0:
            keep = keep & ones.tril(shift + right)
    return keep


def softmax_torch(x: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0,
                  causal: bool = False) -> torch.Tensor:
    """softmax(x * scale + mask) over the last dim with torch ops in x's dtype.

    Bool masks (True = keep) and causal=True (top-left) hide keys with masked_fill(-inf); a
    floating mask is added in x's dtype. A row with no visible key gives zeros (pyllm's
    defined answer and torch SDPA's), with zero gradient, instead of eager softmax's NaN."""
    s = x * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + mask.to(x.dtype)
    if causal:
        c = keep_mask(x.shape[-2], x.shape[-1], causal=True, device=x.device)
        keep = c if keep is None else keep & c
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)
    return s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)


def attention_torch(q, k, v, mask=None, causal: bool = False, alignment: str = "top_left", window=None,
                    scale=None) -> torch.Tensor:
    """F.scaled_dot_product_attention in q's dtype with every mask made explicit (causal and
    window geometry from keep_mask, combined with `mask`; an additive mask is cast to q's dtype)
    and GQA by repeat_interleave. A query with no visible key gives zeros (torch's SDPA does;
    nan_to_num guards the eager fallback)."""
    keep = keep_mask(q.shape[-2], k.shape[-2], causal, alignment, window, q.device)
    m = mask
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    if keep is not None:
        if m is None:
            m = keep
        elif m.dtype == torch.bool:
            m = m & keep
        else:
            m = m.masked_fill(~keep, float("-inf"))
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    return torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale), nan=0.0)


RMS_STYLES = ("torch", "llama", "t5", "gemma")


def rms_norm_torch(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, style: str = "torch",
                   normalized_shape=None) -> torch.Tensor:
    """The RMSNorm each style reproduces, as that library writes it: F.rms_norm ("torch"), or the
    forward of transformers' LlamaRMSNorm ("llama"), T5LayerNorm ("t5") or GemmaRMSNorm
    ("gemma") with `weight` as the module's weight (None: no weight multiply). The modules'
    upcast to fp32 is an upcast to at least fp32, so fp64 inputs give the exact formula."""
    if style == "torch":
        ns = normalized_shape if normalized_shape is not None else (x.shape[-1],)
        return F.rms_norm(x, ns, weight, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if style == "llama":  # LlamaRMSNorm.forward
        input_dtype = x.dtype
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        h = h.to(input_dtype)
        return h if weight is None else weight * h
    if style == "t5":  # T5LayerNorm.forward
        variance = x.to(acc).pow(2).mean(-1, keepdim=True)
        h = x * torch.rsqrt(variance + eps)
        if weight is None:
            return h
        if weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(weight.dtype)
        return weight * h
    if style == "gemma":  # GemmaRMSNorm.forward
        xf = x.to(acc)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            out = out * (1.0 + weight.to(acc))
        return out.type_as(x)
    raise ValueError(f"unknown style {style!r}")
