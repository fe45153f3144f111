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

NATIVE_OPS = sorted(pyllm.ops.native_ops())  # every native op of every registered slice


def _samples(op):
    """The slice's argument tuples for a native op (forward ops get requires_grad samples)."""
    return pyllm.ops.native_ops()[op].native_samples()[op]


@needs_native
def test_every_registered_op_has_samples_and_is_defined():
    """Every schema in torch.ops.pyllm comes from a slice, and every slice op has opcheck samples
    (so no op, present or future, escapes opcheck)."""
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyllm::")}
    assert registered == set(NATIVE_OPS), f"registered {sorted(registered)} vs slices {NATIVE_OPS}"
    for op in NATIVE_OPS:
        assert len(_samples(op)) >= 1, f"{op}: no opcheck samples"


@needs_native
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_opcheck(op):
    for args in _samples(op):
        torch.library.opcheck(getattr(torch.ops.pyllm, op).default, args)


@pytest.mark.emulated
@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_opcheck_emulated(op):
    """The emulated namespace gets the same schemas, fakes and autograd from the same slices."""
    samples = _samples(op)[:1]
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.pyllm_emu, op).default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_registry_lists_every_public_op():
    names = [s.name for s in pyllm.ops.specs()]
    assert names == ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "masked_softmax",
                     "scaled_dot_product_attention",
                     "varlen_attention", "bias_gelu"]
    for spec in pyllm.ops.specs():
        assert getattr(P, spec.name) is spec.functional, f"pyllm.functional.{spec.name} is not the slice's"
        assert spec.kernels and all(os.path.exists(os.path.join(ROOT, k)) for k in spec.kernels), spec.kernels


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
    assert pyllm.last_decision("rms_norm") is None
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


def test_float64_decision_says_reference():
    """fp64 has no kernel: `auto` runs the reference and says why (it once said "native CPU kernel")."""
    with pyllm.use_backend("auto"):
        out = P.layer_norm(torch.randn(2, 5, dtype=torch.float64), 5)
    assert out.dtype == torch.float64
    d = pyllm.last_decision("layer_norm")
    assert (d.backend, d.path, d.uses_kernel) == ("auto", "reference", False)
    if _ext.HAS_C:
        assert d.reason == ("reference (PyTorch) because float64 has no kernel "
                            "(kernels take float32, float16, bfloat16)")
    assert pyllm.explain("layer_norm") == f"layer_norm: backend 'auto' -> {d.reason}"


@needs_native
@pytest.mark.parametrize("spec", pyllm.ops.specs(), ids=lambda s: s.name)
def test_native_backend_rejects_float64(spec):
    """The README promises `native` never falls back silently: fp64 is an error naming the dtype."""
    sample = spec.samples("cpu", torch.float64)[0]
    with pyllm.use_backend("native"):
        with pytest.raises(RuntimeError, match=rf"backend 'native' cannot run {spec.name}: float64 has no kernel"):
            spec.functional(*sample.args, **sample.kwargs)


@needs_native
@pytest.mark.parametrize("spec", pyllm.ops.specs(), ids=lambda s: s.name)
def test_decisions_are_values(spec):
    """Every op records a Decision that names the path it took; the kernel path really ran a kernel."""
    sample = spec.samples("cpu", torch.float32)[0]
    with pyllm.use_backend("auto"):
        spec.functional(*sample.args, **sample.kwargs)
    d = pyllm.last_decision(spec.name)
    assert (d.op, d.backend, d.path, d.kernel, d.reason) == (spec.name, "auto", "native-cpu", "pyllm",
                                                             "native CPU kernel")
    with pyllm.use_backend("torch"):
        spec.functional(*sample.args, **sample.kwargs)
    d = pyllm.last_decision(spec.name)
    assert (d.path, d.uses_kernel, d.kernel) == ("reference", False, None)


@pytest.mark.emulated
@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")
def test_cuda_head_dim_limit_is_a_decision():
    """The CUDA attention kernel's head-dim limit lives once, in the slice, and is a decision."""
    from pyllm.ops.attention import CUDA_MAX_HEAD_DIM

    q = torch.randn(1, 1, 3, CUDA_MAX_HEAD_DIM + 1)
    with pyllm.use_backend("cuda-emulated"):
        P.scaled_dot_product_attention(q, q, q)
    d = pyllm.last_decision("scaled_dot_product_attention")
    assert d.path == "reference"
    assert d.reason == f"reference (PyTorch) because head dim {CUDA_MAX_HEAD_DIM + 1} > {CUDA_MAX_HEAD_DIM} (CUDA kernel limit)"
    with pyllm.use_backend("cuda-emulated"):
        P.scaled_dot_product_attention(q[..., :CUDA_MAX_HEAD_DIM], q[..., :CUDA_MAX_HEAD_DIM], q[..., :CUDA_MAX_HEAD_DIM])
    assert pyllm.last_decision("scaled_dot_product_attention").path == "cuda-emulated"


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


def test_import_pyllm_is_light():
    """`import pyllm` does not import transformers; `import pyllm.hf` does (and registers "pyllm")."""
    r = _run("import sys, pyllm; print('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    r = _run("import sys, pyllm.hf, transformers; "
             "print('transformers' in sys.modules, 'pyllm' in transformers.AttentionInterface._global_mapping)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True True"


def test_disable_ext_env():
    r = _run("import pyllm; from pyllm import _ext; print(_ext.HAS_C, _ext.C_ERROR)", PYLLM_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False disabled by PYLLM_DISABLE_EXT=1"


@needs_native
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_outputs_do_not_alias(op):
    """Schemas declare fresh outputs: no two outputs may share storage (layer_norm_backward
    once returned dw and db as two views of one buffer)."""
    for args in _samples(op):
        with torch.no_grad():
            outs = getattr(torch.ops.pyllm, op)(*args)
        outs = () if outs is None else outs if isinstance(outs, tuple) else (outs,)  # in-place ops: none
        ptrs = [o.untyped_storage().data_ptr() for o in outs if o.numel() > 0]
        assert len(ptrs) == len(set(ptrs)), f"{op}: outputs share storage"


def _kernel_namespaces():
    out = [pytest.param("pyllm", id="native", marks=needs_native)]
    out.append(pytest.param("pyllm_emu", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")]))
    return out


@pytest.mark.parametrize("ns", _kernel_namespaces())
def test_kernel_window_wider_than_the_sequences_sees_every_key(ns):
    """A window of 2**63-1 overflowed the kernels' `i + shift + w` (wrong output, no error); the
    kernels clamp windows to Lq + Lk, so any wide window equals no window. Called below the Python
    layer (which also treats huge widths as unbounded)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(3))
    op = getattr(torch.ops, ns)
    want = op.attention(q, k, v, None, 8 ** -0.5, False, False, -1, -1, 0.0, 0)[0]
    for wl, wr in ((-1, 2 ** 63 - 1), (2 ** 63 - 1, -1), (2 ** 63 - 1, 2 ** 63 - 1), (2 ** 40, 8)):
        got = op.attention(q, k, v, None, 8 ** -0.5, False, False, wl, wr, 0.0, 0)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"window ({wl}, {wr})")
    qv, kv, vv = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    want = op.varlen_attention(qv, kv, vv, cu, cu, 8 ** -0.5, False, -1, -1, 0.0, 0)[0]
    got = op.varlen_attention(qv, kv, vv, cu, cu, 8 ** -0.5, False, 2 ** 63 - 1, 2 ** 63 - 1, 0.0, 0)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_native
def test_add_layer_norm_inplace_kernel_with_overlapping_weight():
    """A weight sharing memory with the input was read after the rows holding it were overwritten
    (output off by up to 2.9); the kernel now reads such operands from a copy."""
    buf = torch.randn(16, generator=torch.Generator().manual_seed(6))
    x, r = buf.view(2, 8), torch.ones(2, 8)
    w = buf[4:12]
    want = torch.nn.functional.layer_norm(x.clone() + r, (8,), w.clone(), None, 1e-5)
    torch.ops.pyllm.add_layer_norm_inplace(x, r, w, None, 1e-5)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
