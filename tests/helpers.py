"""Shared accuracy helpers for pyllm's test suites (norms, softmax, attention).

The rule is FlashAttention's: a kernel's error against a high-precision reference must be
at most a small multiple of the error plain PyTorch makes in the *same* dtype against
that reference, plus an honest floor for the cases where PyTorch happens to be exact:

    max|out - ref| <= max(mult * max|torch_out - ref|, floor * max(1, max|ref|))

``ref`` is computed in fp64 (or fp32 from upcast inputs). The floor is relative to the
magnitude of the reference, so large gradients (e.g. weight grads summed over many
rows) are judged on the same footing as O(1) outputs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

# Default floors (relative to max(1, max|ref|)): a few ulps of the dtype around 1.
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,   # ~8 ulp at 1.0
    torch.float16: 1e-3,   # ~1 ulp at 1.0 (2^-10)
    torch.bfloat16: 8e-3,  # ~1 ulp at 1.0 (2^-7)
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
    to judge by the floor alone. `floor` defaults to FLOORS[out.dtype]. Also checks shape,
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
    scale = max(1.0, fin.abs().max().item()) if fin.numel() else 1.0
    tol = max(mult * base, floor * scale)
    assert err <= tol, (
        f"{name}: max error {err:.3e} vs fp64 reference exceeds {tol:.3e} "
        f"(= max({mult} x torch's error {base:.3e}, floor {floor:.1e} x {scale:.3g})); dtype {out.dtype}")
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


def make_input(shape, dtype, *, layout="contiguous", seed=None, scale=1.0, shift=0.0):
    """A random tensor of `shape` and `dtype` laid out as requested:
    "contiguous", "transposed" (last two dims swapped in memory, so the last dim is strided)
    or "sliced" (a strided slice of a bigger buffer along the last dim)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def rnd(s):
        return (torch.randn(s, generator=g, dtype=torch.float32) * scale + shift).to(dtype)

    shape = tuple(shape)
    if layout == "contiguous":
        return rnd(shape)
    if layout == "transposed":
        if len(shape) < 2:
            raise ValueError("transposed layout needs >= 2 dims")
        base = rnd(shape[:-2] + (shape[-1], shape[-2]))
        t = base.transpose(-1, -2)
        assert t.shape == shape
        return t
    if layout == "sliced":
        base = rnd(shape[:-1] + (2 * shape[-1] + 1,))
        t = base[..., 1::2]
        assert t.shape == shape and (shape[-1] <= 1 or not t.is_contiguous())
        return t
    raise ValueError(f"unknown layout {layout!r}")


@contextlib.contextmanager
def maybe_backend(name: Optional[str]):
    """`pyllm.use_backend(name)`, or nothing when name is None (use the session default)."""
    if name is None:
        yield
        return
    import pyllm

    with pyllm.use_backend(name):
        yield
