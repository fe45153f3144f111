"""Shared helpers for pyllm's test suites (norms, softmax, attention).

The accuracy rule (``assert_close_to_ref``: a kernel's error against an fp64 torch oracle at most a
small multiple of plain PyTorch's own error in the same dtype, with a floor of a few ulps) and the
torch compositions used as oracles and baselines (``keep_mask``, ``softmax_torch``,
``attention_torch``, ``rms_norm_torch``) live in :mod:`pyllm.testing`, so the fuzzer
(``python -m pyllm fuzz``) judges by the same rule; they are re-exported here. This module adds the
input makers and session helpers of the tests.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from pyllm.testing import (FLOORS, RMS_STYLES, assert_close_to_ref, assert_grads_close, attention_torch,  # noqa: F401
                           floor_for, grads_of, keep_mask, max_abs_err, rms_norm_torch, softmax_torch, to64)


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


def ulp_of(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at each value of t (as fp64)."""
    f = torch.finfo(t.dtype)
    mag = t.detach().double().abs().clamp_min(f.tiny)
    return torch.pow(2.0, torch.floor(torch.log2(mag))) * f.eps


def expected_path(op: str = "layer_norm") -> str:
    """What `pyllm.explain(op)` must report in this session for CPU float32 tensors: "native"
    (auto/native backend with the extension loaded) or "reference"."""
    import pyllm
    from pyllm import _ext

    return "native" if (_ext.HAS_C and pyllm.current_backend() in ("auto", "native")) else "reference"
