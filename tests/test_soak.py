"""Long runs (issue 12, item 3): ``python -m pyllm soak`` runs every registered op forward and backward
for a minute and pyllm.hf.optimize + revert 200 times, and fails if resident memory grows after the
warm-up; a deliberately leaking op shows that the check can fail."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from pyllm.tools import soak


def test_soak_command_finds_no_growth():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "pyllm", "soak", "--seconds", "60", "--hf-cycles", "200",
                        "--max-growth-mib", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: no growth beyond the limit" in r.stdout, r.stdout
    assert "optimize + forward + revert x 200" in r.stdout


def test_soak_detects_a_leak(monkeypatch):
    kept = []
    real = soak._one

    def leaky(spec, sample):
        real(spec, sample)
        kept.append(torch.ones(256 * 1024))  # 1 MiB per call, never freed

    monkeypatch.setattr(soak, "_one", leaky)
    res = soak.soak_ops(4.0, report_every=1.0, warmup=1.0, log=lambda *_: None)
    assert res.calls > 20 and res.growth > 8.0, (res.calls, res.growth)
    assert soak.rss_mib() > 0
