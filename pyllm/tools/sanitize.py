"""Calls every registered op's kernels, forward and backward, on every sample of its slice:
the program ``compute-sanitizer`` (memcheck, racecheck, synccheck) runs on GPU day.

    python -m pyllm.tools.sanitize [--device cuda|cpu]

For each op of :func:`pyllm.ops.specs`, each dtype (float32, float16, bfloat16) and each
:class:`pyllm.ops.Sample` of ``spec.samples(device, dtype, requires_grad=True)`` (odd widths,
broadcast and fully masked masks, strided inputs, ...), inside ``pyllm.use_backend("native")``:

* calls ``spec.functional(*sample.args, **sample.kwargs)`` and checks that the recorded backend
  decision (``pyllm.backends.last_decision``) ran a kernel: a call that would run the PyTorch
  reference is a failure (a kernel is missing), never a silent pass;
* when the output requires grad, runs backward of ``out.float().square().sum()`` (the first
  output of a tuple) and checks that every leaf input that requires grad got a finite gradient
  (the samples hold finite random data only).

``--device cpu`` runs the same calls on the CPU kernels, so that the test suite checks this
program on a machine without a GPU. Prints what ran, then ``exercised: <op>, <op>, ...``;
exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _leaves_requiring_grad(sample) -> list:
    tensors = [a for a in sample.args if isinstance(a, torch.Tensor)]
    tensors += [v for v in sample.kwargs.values() if isinstance(v, torch.Tensor)]
    seen, out = set(), []
    for t in tensors:
        if t.requires_grad and t.is_leaf and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def run_sample(spec, sample, sync) -> str | None:
    """Forward (+ backward) of one sample on the native backend. Returns a failure or None."""
    import pyllm
    from pyllm import backends

    leaves = _leaves_requiring_grad(sample)
    for t in leaves:
        t.grad = None  # samples may share an input; check this call's gradient only
    with pyllm.use_backend("native"):
        before = backends.last_decision(spec.name)
        out = spec.functional(*sample.args, **sample.kwargs)
        sync()
        decision = backends.last_decision(spec.name)
        if decision is None or decision is before:
            return f"{spec.name} recorded no backend decision"
        if not decision.uses_kernel:
            return f"no kernel ran ({decision.path}: {decision.reason}); a kernel is missing"
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not first.requires_grad:
            return None
        first.float().square().sum().backward()
        sync()
    for i, t in enumerate(leaves):
        if t.grad is None:
            return f"input {i} (shape {list(t.shape)}) requires grad but got no gradient"
        if not torch.isfinite(t.grad).all():
            return f"input {i} (shape {list(t.shape)}) got a non-finite gradient"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyllm.tools.sanitize", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (GPU day, under compute-sanitizer) or cpu (checks this program without a GPU)")
    args = p.parse_args(argv)

    import pyllm
    import pyllm.ops

    dev = torch.device(args.device)
    info = pyllm.build_info()
    if not info["native_loaded"]:
        print(f"pyllm's native extension is not loaded ({info.get('native_error')}): no kernel to check",
              file=sys.stderr)
        return 1
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device visible", file=sys.stderr)
            return 2
        if not info.get("with_cuda"):
            print("pyllm._C was built without CUDA kernels", file=sys.stderr)
            return 1
        sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731: errors surface at the call that caused them
    else:
        sync = lambda: None  # noqa: E731
    torch.manual_seed(0)

    failures, exercised = [], []
    for spec in pyllm.ops.specs():
        ran = 0
        for dtype in DTYPES:
            samples = spec.samples(dev, dtype, requires_grad=True)
            n_ok = 0
            for sample in samples:
                try:
                    why = run_sample(spec, sample, sync)
                except Exception as e:  # noqa: BLE001: report every failing call, then exit 1
                    why = f"{type(e).__name__}: {e}"
                if why is None:
                    n_ok += 1
                else:
                    failures.append(f"{spec.name} {_dname(dtype)} {sample.desc or repr(sample)}: {why}")
                    print(f"FAIL {failures[-1]}", flush=True)
            ran += n_ok
            print(f"{spec.name:30s} {_dname(dtype):9s} {n_ok}/{len(samples)} samples passed "
                  "(forward + backward, backend 'native')", flush=True)
        if ran == 0:
            failures.append(f"{spec.name}: no sample ran")
            print(f"FAIL {failures[-1]}", flush=True)
        else:
            exercised.append(spec.name)
    sync()
    print("exercised: " + ", ".join(exercised))
    if failures:
        print(f"{len(failures)} failure(s):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
