"""Fuzzing (issue 12, item 5): the hypothesis campaign of ``python -m pyllm fuzz`` (pyllm/tools/fuzz.py) for
every registered op, on the native CPU kernels and the CUDA kernels under the emulation, with a fixed seed
and a bounded number of examples per op and backend (no shrinking, so a failure costs no extra time); the
command itself (a short run passes, a planted wrong kernel fails with a reproduction); and a regression
test for every bug the campaigns found (plain pytest, explicit inputs). Judged by the shared rule
(pyllm.testing.assert_close_to_ref) against the fp64 torch oracle.

Open kernel bugs are left failing here on purpose (see docs/RELIABILITY.md, "Fuzzing"):
test_attention_backward_delta_accuracy (the attention backward takes delta = rowsum(dO * O) from the
output rounded to its dtype). While it is open, the CI campaign of the attention ops can fail on the
same bug.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")

import pyllm  # noqa: E402
from pyllm import _ext, ops  # noqa: E402
from pyllm import functional as P  # noqa: E402
from pyllm.tools import fuzz  # noqa: E402

from helpers import assert_close_to_ref, attention_torch, grads_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

CI_SEED = 20240611
# Examples per op and backend in CI (test_fuzz_ci: about 30 s in all on 2 cores); tiny examples pool
# up to 64 draws (pyllm.tools.fuzz.POOL_ELEMENTS).
CI_EXAMPLES = {"layer_norm": 40, "add_layer_norm": 30, "rms_norm": 40, "add_rms_norm": 30, "masked_softmax": 50,
               "bias_gelu": 50,
               "scaled_dot_product_attention": 25, "varlen_attention": 25}

needs_emu = pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")
BACKENDS = [pytest.param("native", id="native"),
            pytest.param("cuda-emulated", id="emulated", marks=[pytest.mark.emulated, needs_emu])]


def test_every_op_has_a_strategy():
    names = {s.name for s in ops.specs()}
    assert set(fuzz.STRATEGIES) == names, f"ops without a fuzz strategy: {names - set(fuzz.STRATEGIES)}"
    assert set(fuzz.BUILDERS) == names
    assert set(CI_EXAMPLES) == names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CI_EXAMPLES))
def test_fuzz_ci(op, backend):
    r = fuzz.fuzz_pair(op, backend, CI_SEED, max_examples=CI_EXAMPLES[op], shrink=False)
    assert r.failure is None, fuzz.format_failure(r.failure)
    assert r.stats.examples >= CI_EXAMPLES[op]


def test_command_short_run():
    r = subprocess.run([sys.executable, "-m", "pyllm", "fuzz", "--seed", "3", "--seconds", "20", "--max-examples", "5",
                        "--ops", "layer_norm,bias_gelu", "--backend", "all" if _ext.HAS_EMU else "native"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pyllm fuzz: seed 3" in r.stdout and " 0 distinct failures" in r.stdout, r.stdout
    assert "layer_norm" in r.stdout and "bias_gelu" in r.stdout and "5 examples" in r.stdout, r.stdout


def test_command_reports_a_planted_bug(monkeypatch, capsys):
    spec = ops.get("layer_norm")

    def wrong(*args, **kwargs):  # a kernel 1e-2 off everywhere
        return spec.functional(*args, **kwargs) + 1e-2

    monkeypatch.setitem(ops._SPECS, "layer_norm", dataclasses.replace(spec, functional=wrong))
    from pyllm.__main__ import main

    rc = main(["fuzz", "--seed", "1", "--max-examples", "30", "--ops", "layer_norm", "--backend", "native"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL layer_norm on native" in out and "Failing test case" in out and "max error" in out, out
    # the reproduction line is a Case that fails the same way when checked again
    line = next(x for x in out.splitlines() if "reproduce:" in x)
    case = eval(line.split("check(", 1)[1].rsplit(", 'native')", 1)[0], {"Case": fuzz.Case})
    assert isinstance(case, fuzz.Case) and case.op == "layer_norm"
    with pytest.raises(AssertionError, match="max error"):
        fuzz.check(case, "native")


def test_campaign_splits_time_and_reports_examples():
    lines = []
    res = fuzz.campaign(7, ["rms_norm", "bias_gelu"], ["native"], seconds=4.0, log=lines.append)
    assert [r.op for r in res] == ["rms_norm", "bias_gelu"] and all(r.failure is None for r in res)
    assert all(r.stats.examples > 0 for r in res) and len(lines) == 2
    assert sum(r.seconds for r in res) < 20


# --------------------------------------------------------------------------- regression tests
# Found by the campaigns; each is the minimal case, on every backend it concerns.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norm_backward_zero_width_with_bias(op, backend):
    """Fixed (pyllm/ops/layer_norm.py): the bias gradient reshaped the empty upstream gradient with
    reshape(-1, 0), which torch rejects as ambiguous; a normalized width of 0 with a bias raised
    RuntimeError in backward. torch gives empty gradients."""
    x = torch.randn(3, 0, requires_grad=True)
    r = torch.randn(3, 0, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    with pyllm.use_backend(backend):
        out = P.layer_norm(x, 0, None, b) if op == "layer_norm" else P.add_layer_norm(x, r, 0, None, b)[0]
    ins = [x, b] if op == "layer_norm" else [x, r, b]
    grads = grads_of(out.sum(), ins)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in ins]
    ref = F.layer_norm(x if op == "layer_norm" else x + r, (0,), None, b)
    assert out.shape == ref.shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_backward_zero_width_with_bias(backend):
    """Fixed (pyllm/ops/bias_gelu.py): same reshape(-1, 0) in the bias gradient; bias_gelu with a last dim
    of 0 and a bias raised RuntimeError in backward."""
    x = torch.randn(2, 3, 0, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    with pyllm.use_backend(backend):
        out = P.bias_gelu(x, b)
    gx, gb = grads_of(out.sum(), [x, b])
    assert gx.shape == x.shape and gb.shape == b.shape and out.shape == F.gelu(x + b).shape


def test_varlen_torch_baseline_empty_batch():
    """Fixed (pyllm/ops/varlen_attention.py, the torch baseline of the op's test suites): zero sequences
    (cu_seqlens = [0]) made torch.cat fail on an empty list; the op itself returns [0, Hq, Dv]."""
    q, k, v = torch.randn(0, 2, 8), torch.randn(0, 1, 8), torch.randn(0, 1, 4)
    cu = torch.zeros(1, dtype=torch.int32)
    base = ops.get("varlen_attention").torch_baseline(q, k, v, cu, cu, 0, 0)
    assert base.shape == (0, 2, 4)
    assert P.varlen_attention(q, k, v, cu, cu, 0, 0).shape == (0, 2, 4)


def _attention_grads(fn, q, k, v, mask, go, dtype, gqa):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, mask)]
    out = fn(*leaves, gqa)
    return torch.autograd.grad(out, leaves, go.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    # (dtype, B, Hq, Hkv, Lq, Lk, D, q/k scale, mask shape)
    (torch.float16, 8, 2, 2, 13, 13, 1, 2.0, (1, 1, 1, 13)),
    (torch.bfloat16, 32, 2, 2, 13, 13, 2, 2.0, (1, 1, 1, 13)),
], ids=["fp16-d1", "bf16-d2"])
def test_attention_backward_delta_accuracy(case, backend):
    """Fixed (pyllm/ops/attention.py, varlen_attention.py backward): the kernels took
    delta = rowsum(dO * O) from the output already rounded to fp16/bf16, so every dS = P * (dP - delta)
    carried that rounding: dk 3.8x the rule's tolerance at D=1 in fp16, dq 1.3x at D=2 in bf16 (a flash-style
    backward in fp64 fed the rounded O reproduced pyllm's error exactly). The backward now takes delta
    from the unrounded fp32 output (one extra fp32 forward per half-precision backward).
    Still open, not in this test: fp32 with a wide Dv and few keys (Dv 256, Lk 13) gives dq 1.3-2.2x the
    tolerance: delta = sum over Dv of dO * O versus torch's sum over Lk of P * dP (docs/RELIABILITY.md)."""
    dtype, b, hq, hkv, lq, lk, d, qk, mshape = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, lq, d, generator=g) * qk
    k = torch.randn(b, hkv, lk, d, generator=g) * qk
    v = torch.randn(b, hkv, lk, d, generator=g)
    mask = torch.randn(mshape, generator=g) * 3
    go = torch.randn(b, hq, lq, d, generator=g)
    q, k, v, mask, go = (t.to(dtype) for t in (q, k, v, mask, go))  # the test dtype's values, exactly

    def ours(q, k, v, m, gqa):
        with pyllm.use_backend(backend):
            return P.scaled_dot_product_attention(q, k, v, m, enable_gqa=gqa)

    def torch_sdpa(q, k, v, m, gqa):
        return attention_torch(q, k, v, m)

    gqa = hq != hkv
    got = _attention_grads(ours, q, k, v, mask, go, dtype, gqa)
    base = _attention_grads(torch_sdpa, q, k, v, mask, go, dtype, gqa)
    ref = _attention_grads(torch_sdpa, q, k, v, mask, go, torch.float64, gqa)
    for name, o, r, t in zip(["dq", "dk", "dv", "dmask"], got, ref, base):
        assert_close_to_ref(o, r, t, mult=3.0, name=f"{name} {dtype} D={d} on {backend}")
    assert math.isfinite(sum(float(x.double().abs().sum()) for x in got))
