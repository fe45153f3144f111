"""``python -m pyllm gpu-check``: everything to run the day a GPU machine is lent.

Stages (each one's log goes into the report; a failed stage does not stop the next):

1. build   - ``pip install --no-build-isolation --no-deps -e .`` with ``PYLLM_CUDA=1`` and
             ``TORCH_CUDA_ARCH_LIST`` set to this GPU's compute capability, then checks
             in a fresh interpreter that ``pyllm._C`` has CUDA kernels.
2. tests   - the op test suite with ``PYLLM_BACKEND=auto PYLLM_TEST_DEVICE=cuda
             PYLLM_REQUIRE_EXT=1`` (tests/test_device.py runs every op on CUDA tensors then).
3. sanitizer - ``compute-sanitizer`` memcheck, racecheck and synccheck over
             ``python -m pyllm.tools.sanitize --device cuda``, which calls every registered op
             (``pyllm.ops.specs()``) on its samples, forward and backward, in every kernel dtype.
4. bench   - ``python -m pyllm bench --device cuda`` (GB/s and % of measured bandwidth / matmul rate;
             the norms also against Apex's and Liger-Kernel's fused kernels where installed).
5. attention - ``python -m pyllm.tools.attn_bench``: the tensor-core attention forward and decode
             in TFLOP/s and % of the GPU's fp16 peak, against ``F.scaled_dot_product_attention``
             (flash backend) and flash-attn when installed.

Writes one markdown report (``--report``, default gpu_report.md) and exits 0 when every
stage passed, 1 otherwise, and 2 (after printing "no CUDA device visible") without a GPU.

Environment: ``PYLLM_GPU_CHECK_STAGES`` (comma list, default all five),
``PYLLM_GPU_CHECK_TESTS`` (pytest paths, default the op tests), ``MAX_JOBS``.
"""
from __future__ import annotations

import datetime
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("build", "tests", "sanitizer", "bench", "attention")


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def run(cmd, env=None, timeout=None, cwd=ROOT) -> tuple:
    """(returncode, combined output, seconds)."""
    t0 = time.time()
    say("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        return p.returncode, p.stdout, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n[timed out after {timeout} s]", time.time() - t0
    except OSError as e:
        return 127, f"{type(e).__name__}: {e}", time.time() - t0


def tail(text: str, n: int = 60) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join((["... (%d lines cut)" % (len(lines) - n)] if len(lines) > n else []) + lines[-n:])


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cand = os.path.join(home, "bin", "compute-sanitizer")
            if os.path.exists(cand):
                return cand
    hits = sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))
    return hits[-1] if hits else None


class Report:
    def __init__(self):
        self.sections = []
        self.results = {}

    def add(self, stage: str, ok: bool | None, summary: str, log: str = "") -> None:
        self.results[stage] = ok
        status = "PASS" if ok else ("SKIPPED" if ok is None else "FAIL")
        say(f"{stage}: {status} - {summary}")
        body = [f"## {stage}: {status}", "", summary, ""]
        if log:
            body += ["```", tail(log, 80), "```", ""]
        self.sections.append("\n".join(body))


def main(args) -> int:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("no CUDA device visible", file=sys.stderr)
        return 2
    report_path = os.path.abspath(getattr(args, "report", None) or "gpu_report.md")
    stages = [s.strip() for s in os.environ.get("PYLLM_GPU_CHECK_STAGES", ",".join(STAGES)).split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"PYLLM_GPU_CHECK_STAGES: unknown stage(s) {bad}; choose from {list(STAGES)}", file=sys.stderr)
        return 2

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}.{minor}"
    props = torch.cuda.get_device_properties(0)
    py = sys.executable
    rep = Report()
    head = [
        "# pyllm GPU check", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- GPU: {props.name}, compute capability {arch}, {props.total_memory / 2**30:.0f} GiB, "
        f"{props.multi_processor_count} SMs ({torch.cuda.device_count()} visible)",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}",
        f"- stages: {', '.join(stages)}",
    ]
    rc, out, _ = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    head.append(f"- nvidia-smi: {out.strip() if rc == 0 else 'unavailable'}")
    rc, out, _ = run(["nvcc", "--version"])
    head.append(f"- nvcc: {out.strip().splitlines()[-1] if rc == 0 and out.strip() else 'not found'}")

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    # 1. build -------------------------------------------------------------------------
    if "build" in stages:
        benv = dict(env, PYLLM_CUDA="1", TORCH_CUDA_ARCH_LIST=arch,
                    MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
        rc, out, dt = run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                          env=benv, timeout=3600)
        if rc == 0:
            rc2, out2, _ = run([py, "-c", "import json, torch, pyllm; i = pyllm.build_info(); "
                                "print(json.dumps(i)); assert i.get('with_cuda'), 'no CUDA kernels in pyllm._C'"],
                               env=env)
            rep.add("build", rc2 == 0, f"built for sm_{major}{minor} (TORCH_CUDA_ARCH_LIST={arch}) in "
                    f"{dt / 60:.1f} min; build_info: `{out2.strip().splitlines()[-1] if out2.strip() else ''}`",
                    out2 if rc2 else "")
        else:
            rep.add("build", False, f"`pip install --no-build-isolation -e .` failed (exit {rc}) after "
                    f"{dt / 60:.1f} min", out)

    # 2. tests -------------------------------------------------------------------------
    if "tests" in stages:
        # tests/test_device.py runs every op on CUDA tensors when PYLLM_TEST_DEVICE=cuda (and fails,
        # rather than skips, without a GPU); the other files add the CPU suite on this machine.
        wired = os.path.exists(os.path.join(ROOT, "tests", "test_device.py"))
        default_tests = [p for p in ("tests/test_device.py", "tests/test_ops.py", "tests/test_attention.py")
                         if os.path.exists(os.path.join(ROOT, p))]
        tests = os.environ.get("PYLLM_GPU_CHECK_TESTS", "").split() or default_tests or ["tests"]
        tenv = dict(env, PYLLM_BACKEND="auto", PYLLM_TEST_DEVICE="cuda", PYLLM_REQUIRE_EXT="1")
        rc, out, dt = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=tenv, timeout=3600)
        note = "" if wired else (" **Note: tests/test_device.py is missing, so these tests "
                                 "ran on CPU tensors only; the CUDA kernels were not tested here.**")
        last = out.strip().splitlines()[-1] if out.strip() else ""
        rep.add("tests", rc == 0 and wired,
                f"`PYLLM_BACKEND=auto PYLLM_TEST_DEVICE=cuda pytest {' '.join(tests)}` -> exit {rc} in "
                f"{dt:.0f} s: {last}.{note}", out)

    # 3. compute-sanitizer -------------------------------------------------------------
    if "sanitizer" in stages:
        san = find_sanitizer()
        if san is None:
            rep.add("sanitizer", None, "compute-sanitizer not found (install the CUDA toolkit's sanitizer)")
        else:
            rc, helptext, _ = run([san, "--help"])
            # Only instrument pyllm's kernels (torch's own kernels are not ours to judge).
            filt = ["--kernel-name", "kns=pyllm"] if "--kernel-name" in helptext else []
            ok_all, summaries, logs = True, [], []
            for tool in ("memcheck", "racecheck", "synccheck"):
                cmd = [san, "--tool", tool, "--error-exitcode", "1", "--print-limit", "50", *filt,
                       py, "-m", "pyllm.tools.sanitize", "--device", "cuda"]
                rc, out, dt = run(cmd, env=dict(env, PYLLM_BACKEND="native"), timeout=3600)
                ok = rc == 0
                ok_all &= ok
                summaries.append(f"{tool}: {'clean' if ok else f'FAILED (exit {rc})'} ({dt:.0f} s)")
                logs.append(f"===== {tool} =====\n{tail(out, 40)}")
            rep.add("sanitizer", ok_all, "; ".join(summaries) + f" (filter: {' '.join(filt) or 'none'})",
                    "\n".join(logs))

    # 4. benchmarks --------------------------------------------------------------------
    if "bench" in stages:
        bench_md = os.path.splitext(report_path)[0] + "_benchmarks.md"
        bench_csv = os.path.splitext(report_path)[0] + "_benchmarks.csv"
        rc, out, dt = run([py, "-c", "import sys, argparse, pyllm.tools.bench as b; sys.exit(b.main(argparse.Namespace("
                           f"ops=None, models=False, device='cuda', quick=False, output={bench_md!r}, "
                           f"csv={bench_csv!r})))"], env=env, timeout=3600)
        body = ""
        if rc == 0 and os.path.exists(bench_md):
            text = open(bench_md).read()
            body = text.split("## Measured limits", 1)[-1].split("## Method", 1)[0]
            body = "Measured limits" + body
        rep.add("bench", rc == 0, f"`python -m pyllm bench --device cuda` -> exit {rc} in {dt:.0f} s; full page: "
                f"{os.path.basename(bench_md)}, rows: {os.path.basename(bench_csv)}", "" if rc == 0 else out)
        if body:
            rep.sections.append(body)

    # 5. attention throughput -----------------------------------------------------------
    if "attention" in stages:
        attn_md = os.path.splitext(report_path)[0] + "_attention.md"
        rc, out, dt = run([py, "-m", "pyllm.tools.attn_bench", "--device", "cuda", "--output", attn_md],
                          env=env, timeout=1800)
        rep.add("attention", rc == 0, f"`python -m pyllm.tools.attn_bench --device cuda` -> exit {rc} in {dt:.0f} s "
                f"(model to compare with: docs/GPU.md)", "" if rc == 0 else out)
        if rc == 0 and os.path.exists(attn_md):
            rep.sections.append("### Attention forward and decode\n\n" + open(attn_md).read())

    verdict = all(v is not False for v in rep.results.values())
    head.append(f"- verdict: **{'PASS' if verdict else 'FAIL'}** "
                + ", ".join(f"{k}={'pass' if v else ('skipped' if v is None else 'FAIL')}" for k, v in rep.results.items()))
    with open(report_path, "w") as f:
        f.write("\n".join(head) + "\n\n" + "\n".join(rep.sections) + "\n")
    say(f"report written to {report_path}: {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1
