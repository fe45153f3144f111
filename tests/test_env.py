"""``python -m pyllm env``: the bug-report block (versions, CPU flags from /proc/cpuinfo, CUDA
archs, kernels, backends), as text and as JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pyllm
from pyllm.tools import env as pyllm_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pyllm", "env", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


def _proc_flags():
    """The flags of the first processor in /proc/cpuinfo, read independently of pyllm."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.split(":")[0].strip() in ("flags", "Features"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def text():
    return _run()


@pytest.fixture(scope="module")
def as_json():
    return json.loads(_run("--json"))


def test_env_text_has_versions_and_the_cpu_flags_of_proc_cpuinfo(text):
    assert f"torch         {torch.__version__}" in text
    assert f"pyllm         {pyllm.__version__}" in text
    assert f"python        {sys.version.split()[0]}" in text
    flags = _proc_flags()
    assert flags, "this test needs /proc/cpuinfo with a flags line"
    line = next(line for line in text.splitlines() if line.startswith("CPU flags (/proc/cpuinfo):"))
    shown = dict(item.split("=") for item in line.split(":", 1)[1].split())
    assert set(shown) == set(pyllm_env.CPU_FLAGS)
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= set(shown)
    for flag, yn in shown.items():
        assert yn == ("yes" if flag in flags else "no"), flag
    assert f"torch CPU capability     {torch.backends.cpu.get_cpu_capability()}" in text
    bi = pyllm.build_info()
    if bi["native_loaded"]:
        assert "native extension (pyllm._C): loaded" in text
        assert f"kernels loaded: {', '.join(bi['kernels'])}" in text
        assert f"pyllm CPU kernel variant {pyllm_env.cpu_kernel_path(flags)}" in text
    else:
        assert "native extension (pyllm._C): NOT loaded" in text
    assert "emulated CUDA module (pyllm._C_emu): " + ("loaded" if bi["emulated_loaded"] else "NOT loaded") in text
    assert f"backends available: {', '.join(pyllm.available_backends())}" in text


def test_env_json_parses_and_matches(as_json):
    env = as_json
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["pyllm"] == pyllm.__version__
    flags = _proc_flags()
    assert env["cpu"]["flags"] == {f: f in flags for f in pyllm_env.CPU_FLAGS}
    bi = pyllm.build_info()
    ext = env["extension"]
    assert ext["native_loaded"] == bi["native_loaded"] and ext["emulated_loaded"] == bi["emulated_loaded"]
    assert ext["kernels"] == bi.get("kernels", [])
    assert ext["cuda_archs_built"] == [a for a in (bi.get("cuda_archs") or "").replace(",", ";").split(";") if a]
    assert env["backends"]["available"] == pyllm.available_backends()
    assert env["cuda"]["available"] == torch.cuda.is_available()


def test_cpuinfo_parser_and_kernel_variant_on_other_cpus(tmp_path):
    # An AMX machine's /proc/cpuinfo (abridged) and one without AVX2: the detection must not
    # depend on the machine the tests run on.
    amx = tmp_path / "cpuinfo_amx"
    amx.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
                   "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    info = pyllm_env.read_cpuinfo(str(amx))
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_bf16", "amx_tile", "amx_bf16", "avx512f"} <= info["flags"] and "fpu" in info["flags"]
    assert pyllm_env.cpu_kernel_path(info["flags"]) == "avx512f"
    assert pyllm_env.cpu_kernel_path({"avx2", "fma"}) == "avx2,fma"
    assert pyllm_env.cpu_kernel_path({"avx2"}).startswith("default")
    assert pyllm_env.read_cpuinfo(str(tmp_path / "missing")) == {"model": None, "flags": set()}


def test_info_still_prints_json():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pyllm", "info"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["torch_runtime"] == torch.__version__
