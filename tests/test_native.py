"""Tests about the native op layer and the backend registry:

* torch.library.opcheck of every op in torch.ops.pyllm (schemas, fake tensors, autograd
  registration, AOT dispatch);
* the backend registry (`pyllm.use_backend`, `pyllm.explain`, `native` and `cuda-emulated`
  failing clearly when unavailable, PYLLM_BACKEND validation);
* loading: `import pyllm` on its own (before torch) loads the extension.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyllm
from pyllm import _ext, backends
from pyllm import functional as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_native = pytest.mark.skipif(not _ext.HAS_C, reason=f"native extension not loaded ({_ext.C_ERROR})")

OPS = ["layer_norm", "add_layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
       "masked_softmax", "masked_softmax_backward"]


def _samples(op):
    """A couple of argument tuples per op; forward ops get requires_grad samples."""
    g = dict(requires_grad=True)
    n = 7
    x32, xh = torch.randn(3, n, **g), torch.randn(2, 3, n).bfloat16().requires_grad_()
    w, b = torch.randn(n, **g), torch.randn(n, **g)
    if op == "layer_norm":
        return [(x32, w, b, 1e-5), (xh, None, torch.randn(n).bfloat16(), 1e-6), (torch.randn(4, 1), None, None, 1e-5)]
    if op == "add_layer_norm":
        return [(x32, torch.randn(3, n, **g), w, b, 1e-5), (xh, torch.randn(2, 3, n).bfloat16(), None, None, 1e-5)]
    if op == "layer_norm_backward":
        x = torch.randn(3, n)
        _, mean, rstd = torch.ops.pyllm.layer_norm(x, w.detach(), None, 1e-5)
        return [(torch.randn(3, n), x, mean, rstd, w.detach(), None),
                (torch.randn(3, n), x, mean, rstd, None, torch.randn(3, n))]
    if op == "rms_norm":
        return [(x32, w, 1e-6, None, 0.0, torch.float32),
                (xh, torch.randn(n, **g), 1e-6, torch.bfloat16, 0.0, torch.float32),
                (torch.randn(2, n).half().requires_grad_(), w, 1e-6, None, 1.0, torch.float16)]
    if op == "rms_norm_backward":
        x = torch.randn(3, n)
        _, rstd = torch.ops.pyllm.rms_norm(x, None, 1e-6, None, 0.0, torch.float32)
        return [(torch.randn(3, n), x, rstd, w.detach(), None, 0.0),
                (torch.randn(3, n), x, rstd, None, torch.float16, 1.0)]
    if op == "masked_softmax":
        s = torch.randn(2, 2, 3, 5, **g)
        return [(s, torch.rand(2, 1, 1, 5) < 0.7, 0.5, False),
                (s, torch.randn(1, 2, 3, 5, **g), 1.0, True),
                (torch.randn(4, 6).half().requires_grad_(), None, 2.0, False)]
    if op == "masked_softmax_backward":
        y = torch.randn(2, 3, 5).softmax(-1)
        return [(torch.randn(2, 3, 5), y, 0.5), (torch.randn(2, 3, 5).half(), y.half(), 1.0)]
    raise KeyError(op)


@needs_native
def test_every_op_is_covered():
    """OPS lists every op registered in the pyllm namespace (new ops must join opcheck)."""
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyllm::")}
    norm_softmax = {o for o in registered if "norm" in o or "softmax" in o}
    assert norm_softmax == set(OPS), f"registered {sorted(registered)}"


@needs_native
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args in _samples(op):
        torch.library.opcheck(getattr(torch.ops.pyllm, op).default, args)


# -------------------------------------------------------------------------- backend registry
def test_available_backends():
    assert pyllm.available_backends() == ["auto", "native", "torch", "cuda-emulated"]


def test_use_backend_nests_and_restores():
    outer = pyllm.current_backend()
    with pyllm.use_backend("torch"):
        assert pyllm.current_backend() == "torch"
        with pyllm.use_backend("auto"):
            assert pyllm.current_backend() == "auto"
            with pyllm.use_backend("torch"):
                assert pyllm.current_backend() == "torch"
            assert pyllm.current_backend() == "auto"
        assert pyllm.current_backend() == "torch"
    assert pyllm.current_backend() == outer


def test_use_backend_restores_after_exception():
    outer = pyllm.current_backend()
    with pytest.raises(KeyError):
        with pyllm.use_backend("torch"):
            raise KeyError("boom")
    assert pyllm.current_backend() == outer


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of \['auto', 'native', 'torch', 'cuda-emulated'\]"):
        with pyllm.use_backend("fast"):
            pass


def test_explain_strings():
    backends._LAST.pop("rms_norm", None)
    assert pyllm.explain("rms_norm") == "rms_norm: not called yet"
    x = torch.randn(2, 8)
    with pyllm.use_backend("torch"):
        P.rms_norm(x, 8)
        P.masked_softmax(x)
    assert pyllm.explain("rms_norm") == "rms_norm: backend 'torch' -> reference (PyTorch) because backend is 'torch'"
    assert pyllm.explain("masked_softmax").startswith("masked_softmax: backend 'torch' -> reference")
    everything = pyllm.explain()
    assert "rms_norm: backend 'torch'" in everything and "masked_softmax: backend 'torch'" in everything
    with pyllm.use_backend("auto"):
        P.rms_norm(x, 8)
    want = "native CPU kernel" if _ext.HAS_C else "reference (PyTorch) because native extension not loaded"
    assert pyllm.explain("rms_norm").startswith("rms_norm: backend 'auto' -> ")
    assert want in pyllm.explain("rms_norm")


def test_explain_float64_still_reports_selection():
    with pyllm.use_backend("auto"):
        out = P.layer_norm(torch.randn(2, 5, dtype=torch.float64), 5)
    assert out.dtype == torch.float64
    assert pyllm.explain("layer_norm").startswith("layer_norm: backend 'auto'")


def test_native_backend_raises_when_extension_missing(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_C", False)
    monkeypatch.setattr(_ext, "C_ERROR", "ImportError: simulated")
    x = torch.randn(2, 8)
    with pyllm.use_backend("native"):
        with pytest.raises(RuntimeError, match=r"backend 'native' cannot run layer_norm: native extension not loaded \(ImportError: simulated\)"):
            P.layer_norm(x, 8)
        with pytest.raises(RuntimeError, match=r"backend 'native' cannot run masked_softmax"):
            P.masked_softmax(x)
    with pyllm.use_backend("auto"):  # auto falls back and says why
        torch.testing.assert_close(P.layer_norm(x, 8), torch.nn.functional.layer_norm(x, (8,)))
        assert pyllm.explain("layer_norm") == (
            "layer_norm: backend 'auto' -> reference (PyTorch) because native extension not loaded "
            "(ImportError: simulated)")


def test_native_backend_rejects_unsupported_device():
    with pyllm.use_backend("native"):
        with pytest.raises(RuntimeError, match=r"backend 'native' cannot run rms_norm: .*\['meta'\]|native extension not loaded"):
            P.rms_norm(torch.empty(2, 8, device="meta"), 8)


def test_emulated_backend_raises_when_missing(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EMU", False)
    monkeypatch.setattr(_ext, "C_EMU_ERROR", "ModuleNotFoundError: simulated")
    with pyllm.use_backend("cuda-emulated"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda-emulated' is unavailable \(ModuleNotFoundError: simulated\); build with PYLLM_EMULATED=1"):
            P.masked_softmax(torch.randn(2, 3))


@needs_native
def test_native_backend_runs_kernels():
    x = torch.randn(3, 16)
    with pyllm.use_backend("native"):
        P.layer_norm(x, 16)
        P.add_layer_norm(x, x, 16)
        P.rms_norm(x, 16)
        P.masked_softmax(x, None, 1.0, True)
    for op in ("layer_norm", "add_layer_norm", "rms_norm", "masked_softmax"):
        assert pyllm.explain(op) == f"{op}: backend 'native' -> native CPU kernel"


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYLLM_")}
    e.update(env, PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def test_import_pyllm_first_and_backend_env():
    """`import pyllm` before torch loads the native extension (it links libc10), and
    PYLLM_BACKEND picks the default backend; an invalid value is a clear error."""
    code = ("import pyllm, torch; from pyllm import _ext; "
            "print(pyllm.current_backend(), _ext.HAS_C, _ext.C_ERROR)")
    r = _run(code, PYLLM_BACKEND="torch")
    assert r.returncode == 0, r.stderr
    backend, has_c, err = r.stdout.split(maxsplit=2)
    assert backend == "torch"
    if _ext.HAS_C:  # built here: must also load when pyllm is imported before torch
        assert has_c == "True", f"import pyllm (before torch) failed to load pyllm._C: {err}"
        assert "RuntimeWarning" not in r.stderr
    bad = _run("import pyllm", PYLLM_BACKEND="bogus")
    assert bad.returncode != 0
    assert "PYLLM_BACKEND='bogus' is not one of ['auto', 'native', 'torch', 'cuda-emulated']" in bad.stderr


def test_disable_ext_env():
    r = _run("import pyllm; from pyllm import _ext; print(_ext.HAS_C, _ext.C_ERROR)", PYLLM_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False disabled by PYLLM_DISABLE_EXT=1"


@needs_native
@pytest.mark.parametrize("op", OPS)
def test_outputs_do_not_alias(op):
    """Schemas declare fresh outputs: no two outputs may share storage (layer_norm_backward
    once returned dw and db as two views of one buffer)."""
    for args in _samples(op):
        with torch.no_grad():
            outs = getattr(torch.ops.pyllm, op)(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel() > 0]
        assert len(ptrs) == len(set(ptrs)), f"{op}: outputs share storage"
