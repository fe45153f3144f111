"""``python -m pyllm env``: what a bug report needs, in one paste.

Versions (python, torch, pyllm, transformers when installed, CUDA), the CPU model and the
instruction-set flags the kernel reads at run time (from ``/proc/cpuinfo``), which code path
pyllm's CPU kernels take on this CPU, the CUDA archs the extension was built for, the kernels it
loaded, the backends available and the state of the emulated-CUDA module. Plain text, or JSON
with ``--json``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys

# The CPU flags that matter to pyllm and torch on x86 (names as /proc/cpuinfo spells them).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def read_cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """``{"model": str | None, "flags": set of str}`` of the first processor in ``path``."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return {"model": model, "flags": flags}


def cpu_kernel_path(flags: set) -> str:
    """The variant of pyllm's CPU row kernels the loader picks on a CPU with ``flags``.

    The extension does not report it: csrc/cpu/rowops.cpp builds each hot loop with GCC
    ``target_clones("avx512f", "avx2,fma", "default")`` and the ifunc resolver takes the first
    variant the CPU supports; this mirrors that rule."""
    if "avx512f" in flags:
        return "avx512f"
    if "avx2" in flags and "fma" in flags:
        return "avx2,fma"
    return "default (no AVX2+FMA)"


def _version(dist: str):
    """The installed version of distribution ``dist`` without importing it, or None."""
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # installed without metadata
        return "installed (version unknown)"


def collect() -> dict:
    import torch

    import pyllm

    cpu = read_cpuinfo()
    flags = cpu["flags"]
    bi = pyllm.build_info()
    env = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyllm": pyllm.__version__,
            "transformers": _version("transformers"),
            "cuda_torch_built": torch.version.cuda,
        },
        "platform": platform.platform(),
        "cpu": {
            "model": cpu["model"] or platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "flags": {f: f in flags for f in CPU_FLAGS},
            "flags_source": "/proc/cpuinfo" if flags else "unavailable",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pyllm_kernel_path": cpu_kernel_path(flags) if bi["native_loaded"] else "none (native extension not loaded)",
        },
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [],
        },
        "extension": {
            "native_loaded": bi["native_loaded"],
            "native_error": bi["native_error"],
            "torch_built": bi.get("torch_built"),
            "compiler": bi.get("compiler"),
            "with_cuda": bi.get("with_cuda"),
            "cuda_version_built": bi.get("cuda_version"),
            "cuda_archs_built": [a for a in (bi.get("cuda_archs") or "").replace(",", ";").split(";") if a],
            "kernels": bi.get("kernels", []),
            "emulated_loaded": bi["emulated_loaded"],
            "emulated_error": bi["emulated_error"],
        },
        "backends": {
            "available": pyllm.available_backends(),
            "current": pyllm.current_backend(),
        },
        "env_vars": {k: os.environ[k] for k in ("PYLLM_DISABLE_EXT", "PYLLM_REQUIRE_EXT", "PYLLM_BACKEND",
                                                "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
                     if k in os.environ},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["cuda"]["devices"].append({"name": p.name, "capability": f"sm_{p.major}{p.minor}",
                                           "memory_gib": round(p.total_memory / 2**30, 1)})
    return env


def _yn(v) -> str:
    return "yes" if v else "no"


def format_text(env: dict) -> str:
    v, cpu, cu, ext, be = env["versions"], env["cpu"], env["cuda"], env["extension"], env["backends"]
    lines = ["pyllm environment", "",
             f"python        {v['python']}",
             f"torch         {v['torch']} (built with CUDA {v['cuda_torch_built'] or 'none'})",
             f"pyllm         {v['pyllm']}",
             f"transformers  {v['transformers'] or 'not installed'}",
             f"platform      {env['platform']}", "",
             f"CPU           {cpu['model']} ({cpu['logical_cores']} logical cores, {cpu['torch_threads']} torch threads)",
             f"CPU flags ({cpu['flags_source']}): "
             + " ".join(f"{f}={_yn(on)}" for f, on in cpu["flags"].items()),
             f"torch CPU capability     {cpu['torch_cpu_capability']}",
             f"pyllm CPU kernel variant {cpu['pyllm_kernel_path']}", "",
             f"CUDA available: {_yn(cu['available'])}"]
    for d in cu["devices"]:
        lines.append(f"  GPU {d['name']} ({d['capability']}, {d['memory_gib']} GiB)")
    lines += ["",
              "native extension (pyllm._C): " + ("loaded" if ext["native_loaded"] else f"NOT loaded ({ext['native_error']})")]
    if ext["native_loaded"]:
        lines += [f"  built against torch {ext['torch_built']}, compiler {ext['compiler']}",
                  f"  built with CUDA: {_yn(ext['with_cuda'])}"
                  + (f" (CUDA {ext['cuda_version_built']})" if ext["with_cuda"] else ""),
                  f"  CUDA archs built: {', '.join(ext['cuda_archs_built']) or 'none'}",
                  f"  kernels loaded: {', '.join(ext['kernels']) or 'none'}"]
    lines += ["emulated CUDA module (pyllm._C_emu): "
              + ("loaded" if ext["emulated_loaded"] else f"NOT loaded ({ext['emulated_error']})"),
              f"backends available: {', '.join(be['available'])} (current: {be['current']})"]
    if env["env_vars"]:
        lines.append("environment: " + " ".join(f"{k}={val}" for k, val in env["env_vars"].items()))
    return "\n".join(lines)


def main(args) -> int:
    env = collect()
    if getattr(args, "json", False):
        print(json.dumps(env, indent=2, sort_keys=False))
    else:
        print(format_text(env))
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m pyllm.tools.env", description=__doc__)
    p.add_argument("--json", action="store_true")
    sys.exit(main(p.parse_args()))
