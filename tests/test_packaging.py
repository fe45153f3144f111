"""Packaging (issue 14): the sdist carries everything the build reads; the extras pin what
requirements.txt pins; ``python -m pyllm selftest`` (what the wheel's CI step runs in a fresh
virtual environment, `make test-wheel`) passes here and fails on a wrong kernel."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tarfile
import tomllib

import pytest
import torch

import pyllm
from pyllm.tools import selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked(*paths):
    try:
        out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"the packaging tests run from a git clone: {e}")
    return {p for p in out.stdout.splitlines() if p}


def test_sdist_contains_every_build_input(tmp_path):
    env = dict(os.environ, PYLLM_CUDA="0", PYLLM_EMULATED="0")  # the sdist does not compile anything
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(tmp_path)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    needed = _tracked("csrc", "cmake", "pyllm") | {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
                                                   "requirements.txt", "CMakeLists.txt"}
    assert needed, "nothing tracked?"
    missing = sorted(needed - members)
    assert not missing, f"the sdist lacks {missing[:10]} ({len(missing)} files)"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "build outputs in the sdist"


def test_extras_pin_what_requirements_pin():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = {line.split("==")[0].strip().lower(): line.strip() for line in f
                if "==" in line and not line.lstrip().startswith("#")}
    extras = project["optional-dependencies"]
    assert {"hf", "bench", "test"} <= set(extras), extras
    assert project["dependencies"] == [pins["torch"]], "the library itself needs only the pinned torch"
    for extra, reqs in extras.items():
        for req in reqs:
            name = req.split("==")[0].strip().lower()
            assert "==" in req and pins.get(name) == req, f"pyllm[{extra}]: {req!r} vs requirements.txt {pins.get(name)!r}"


@pytest.mark.skipif(not pyllm._ext.HAS_C, reason="selftest checks the native kernels, which are not loaded")
def test_selftest_passes_and_catches_a_wrong_kernel(capsys):
    assert selftest.main() == 0
    out = capsys.readouterr().out
    assert "selftest passed" in out and out.count("  ok    cpu") == len(pyllm.ops.specs()), out

    spec = pyllm.ops.get("rms_norm")
    wrong = dataclasses.replace(spec, functional=lambda *a, **k: spec.functional(*a, **k) * (1 + 2 ** -12))
    with pytest.raises(AssertionError, match="exceeds"):
        selftest.check_op(wrong, "cpu")
    with pyllm.use_backend("torch"), pytest.raises(AssertionError, match="no kernel ran"):
        selftest.check_op(spec, "cpu")
