"""NaN and Inf propagate as in torch (issue 12, first part: softmax and attention).

The torch composition of each op is the oracle of *where* non-finite values appear: a NaN in a
visible score makes that softmax row NaN everywhere (masked positions included), a NaN key makes
every query that sees it NaN, an Inf in V gives what p @ V gives. Only rows whose keys are all
masked get zeros. Checked row for row on the native kernels, the reference and the emulated CUDA
kernels.
"""
from __future__ import annotations

import pytest
import torch

import pyllm
import pyllm.functional as PF
from pyllm import _ext

from helpers import maybe_backend

NAN, INF = float("nan"), float("inf")
BACKENDS = [pytest.param(None, id="session"), pytest.param("torch", id="reference"), pytest.param(
    "cuda-emulated", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")])]


def _pattern(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def _assert_same_pattern(got, want, what):
    for g, w, kind in zip(_pattern(got), _pattern(want), ("NaN", "+Inf", "-Inf")):
        assert torch.equal(g, w), f"{what}: {kind} at {int(g.sum())} places, torch has {int(w.sum())}"


def _softmax_torch(x, keep, scale):
    s = (x.double() * scale).masked_fill(~keep, -INF)
    dead = ~keep.any(-1, keepdim=True)  # only rows with no visible key get zeros
    return torch.where(dead, 0.0, s.softmax(-1))


SOFTMAX_CASES = {
    "one NaN score": lambda x, keep: x.index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(NAN)),
    "NaN at a masked position": lambda x, keep: x.index_put_((torch.tensor(1), torch.tensor(7)), torch.tensor(NAN)),
    "whole row NaN": lambda x, keep: x[2].fill_(NAN),
    "+Inf score": lambda x, keep: x.index_put_((torch.tensor(3), torch.tensor(0)), torch.tensor(INF)),
    "-Inf score": lambda x, keep: x.index_put_((torch.tensor(0), torch.tensor(5)), torch.tensor(-INF)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_masked_softmax_nonfinite(backend, dtype, case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g)
    keep = torch.ones(5, 9, dtype=torch.bool)
    keep[1, 6:] = False   # a partly masked row (position 7 hidden)
    keep[4] = False       # a fully masked row: zeros
    SOFTMAX_CASES[case](x, keep)
    x = x.to(dtype)
    with maybe_backend(backend):
        got = PF.masked_softmax(x, keep, scale=0.5)
    want = _softmax_torch(x, keep, 0.5)
    _assert_same_pattern(got, want, f"masked_softmax {case}")
    assert torch.equal(got[4], torch.zeros_like(got[4]))  # fully masked: zeros, never NaN
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-2 if dtype != torch.float32 else 1e-6,
                               rtol=0)


def _attention_torch(q, k, v, keep):
    """The composition softmax(masked_fill(q k^T * scale, ~keep, -inf)) @ v in fp64: a hidden key's
    NaN score is replaced, not added to (F.scaled_dot_product_attention adds its -inf bias to the
    NaN and spreads it to every query; masked_fill, as the reference and the kernels, does not)."""
    s = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return s.masked_fill(~keep, -INF).softmax(-1) @ v.double()


ATTN_CASES = {
    "NaN in q": ("q", (0, 0, 1, 3), NAN),
    "NaN in k": ("k", (0, 0, 2, 3), NAN),
    "NaN in v": ("v", (0, 1, 4, 5), NAN),
    "+Inf in v": ("v", (0, 1, 4, 5), INF),
    "NaN in a masked key": ("k", (0, 0, 5, 0), NAN),
    "+Inf in k": ("k", (0, 1, 0, 2), INF),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_nonfinite(backend, case):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g), \
        torch.randn(1, 2, 6, 16, generator=g)
    which, idx, val = ATTN_CASES[case]
    {"q": q, "k": k, "v": v}[which][idx] = val
    keep = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    keep[..., 5] = False  # key 5 hidden from every query
    with maybe_backend(backend):
        got = PF.scaled_dot_product_attention(q, k, v, keep)
    want = _attention_torch(q, k, v, keep)
    _assert_same_pattern(got, want, f"attention {case}")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fully_masked_row_stays_zero_next_to_nan(backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 3, 8, generator=g) for _ in range(3))
    k[0, 0, 1, 0] = NAN
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    keep[0, 0, 2] = False           # query 2 sees nothing: zeros
    keep[0, 0, 0, 1] = False        # query 0 does not see the NaN key: finite
    with maybe_backend(backend):
        out = PF.scaled_dot_product_attention(q, k, v, keep)
    assert torch.isfinite(out[0, 0, 0]).all()
    assert torch.isnan(out[0, 0, 1]).all()
    assert torch.equal(out[0, 0, 2], torch.zeros(8))
