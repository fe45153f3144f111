"""Faults (issue 12, item 6): the extension missing, corrupt, missing a symbol, or built against
another torch. Each case runs `import pyllm` in a fresh interpreter on a copy of the package set
up with that fault, and checks: one warning naming the reason and the exact rebuild command, the
reference path computes the right answer, and PYLLM_REQUIRE_EXT=1 turns the warning into an
ImportError with the same message."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from pyllm import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pyllm")
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
WARNING = "pyllm: native kernels unavailable"

# Runs the reference path and prints what pyllm loaded; importing a few submodules and pyllm again
# must not repeat the warning.
PROBE = """
import sys
# the package copy only: the editable install's finder would supply the checkout's own pyllm._C
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
import warnings
warnings.simplefilter("always")
import torch, torch.nn.functional as F
import pyllm, pyllm.functional as P, pyllm.nn
import pyllm
from pyllm import _ext
x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
w, b = torch.rand(32) + 0.5, torch.randn(32)
ok = torch.allclose(P.layer_norm(x, 32, w, b), F.layer_norm(x, (32,), w, b), atol=1e-6, rtol=0)
print("HAS_C", _ext.HAS_C, "OK", ok, "EXPLAIN", pyllm.explain("layer_norm"))
"""


def _package_copy(tmp_path, *, so_from=None, so_bytes=None, build_json=None):
    """tmp_path/pyllm: the Python package without its native modules, plus the given fault."""
    dst = tmp_path / "pyllm"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build.json"))
    target = dst / f"_C{SUFFIX}"
    if so_from is not None:
        shutil.copyfile(so_from, target)
    if so_bytes is not None:
        target.write_bytes(so_bytes)
    if build_json is not None:
        (dst / "_build.json").write_text(json.dumps(build_json))
    return tmp_path


def _run(path, code=PROBE, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYLLM_")}
    e.update(env, PYTHONPATH=str(path))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300,
                          cwd=str(path))


def _missing_symbol_so(tmp_path):
    """A shared library whose PyInit__C needs a symbol nothing defines: dlopen fails with
    'undefined symbol', as an extension linked against another libtorch does."""
    src = tmp_path / "bad.c"
    src.write_text("extern void pyllm_no_such_symbol(void);\n"
                   "void *PyInit__C(void) { pyllm_no_such_symbol(); return 0; }\n")
    out = tmp_path / "bad.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def _real_so():
    path = os.path.join(PKG, f"_C{SUFFIX}")
    assert os.path.exists(path), f"the tests need the built extension at {path}"
    return path


def _case(name, tmp_path):
    now = {"torch": torch.__version__}
    if name == "missing":
        return _package_copy(tmp_path), "is not built"
    if name == "corrupt":
        return _package_copy(tmp_path, so_bytes=b"\x7fELF not really a shared library" * 64,
                             build_json=now), "ImportError"
    if name == "missing-symbol":
        return _package_copy(tmp_path, so_from=_missing_symbol_so(tmp_path), build_json=now), \
            "undefined symbol: pyllm_no_such_symbol"
    if name == "other-torch":  # recorded by the build: refused before the library is loaded
        return _package_copy(tmp_path, so_from=_real_so(), build_json={"torch": "2.11.0"}), \
            f"was built against torch 2.11.0, but torch {torch.__version__} is running"
    raise AssertionError(name)


FAULTS = ["missing", "corrupt", "missing-symbol", "other-torch"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_warns_once_and_falls_back(fault, tmp_path):
    path, reason = _case(fault, tmp_path)
    r = _run(path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(WARNING) == 1, r.stderr
    line = r.stderr[r.stderr.index(WARNING):]
    assert reason in line, line
    assert "pip install --no-build-isolation" in line and sys.executable in line, line
    assert "HAS_C False OK True" in r.stdout, r.stdout
    assert "reference" in r.stdout.split("EXPLAIN", 1)[1], r.stdout


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_an_error_when_required(fault, tmp_path):
    path, reason = _case(fault, tmp_path)
    r = _run(path, PYLLM_REQUIRE_EXT="1")
    assert r.returncode != 0
    assert "ImportError: pyllm: could not load pyllm._C" in r.stderr, r.stderr
    assert reason in r.stderr and "pip install --no-build-isolation" in r.stderr, r.stderr


def test_other_torch_reported_by_the_module_itself(tmp_path):
    """No build record (an older build, or one copied by hand): the version the loaded module
    reports is checked. Simulated by making the running torch claim another version."""
    path = _package_copy(tmp_path, so_from=_real_so())
    code = PROBE.replace("import warnings", "import torch; torch.__version__ = '2.11.0'\nimport warnings", 1)
    r = _run(path, code)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(WARNING) == 1, r.stderr
    assert "but torch 2.11.0 is running" in r.stderr, r.stderr
    assert "HAS_C False OK True" in r.stdout


def test_healthy_copy_loads_without_warning(tmp_path):
    """The control: the same copy with the real library and a matching record loads the kernels
    (so the faults above are what makes the difference)."""
    path = _package_copy(tmp_path, so_from=_real_so(), build_json={"torch": torch.__version__})
    r = _run(path)
    assert r.returncode == 0, r.stderr
    assert WARNING not in r.stderr, r.stderr
    assert "HAS_C True OK True" in r.stdout, r.stdout


def test_rebuild_command_names_this_checkout_and_python():
    cmd = _ext.rebuild_command()
    assert cmd == f"cd {ROOT} && {sys.executable} -m pip install --no-build-isolation --no-deps -e ."
