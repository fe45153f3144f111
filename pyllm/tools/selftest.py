"""``python -m pyllm selftest``: does this installation work? For every registered op, on the CPU
(and on CUDA when a GPU is visible): the native kernels are loaded and chosen, and each of the op's
float32 samples (forward, and backward where the sample asks for gradients) agrees with torch's
composition in fp64 under the project's accuracy rule (:func:`pyllm.testing.assert_close_to_ref`:
2x torch's own fp32 error for outputs, 3x for gradients).

Needs torch only (no pytest, numpy or transformers): the wheel's CI step runs it in a fresh virtual
environment. Exit status 0 when every check passes, 1 otherwise (each failure is printed).
"""
from __future__ import annotations

import time

import torch


def check_op(spec, device: str) -> int:
    """Checks every float32 sample of ``spec`` on ``device`` (a pyllm kernel must run); returns the
    number of samples."""
    import pyllm
    from pyllm.testing import check_op_samples

    def kernel_ran(spec):
        decision = pyllm.backends.last_decision(spec.name)
        if decision is None or not decision.uses_kernel:
            raise AssertionError(f"{spec.name}: no kernel ran ({decision})")

    return check_op_samples(spec, device, torch.float32, kernel_ran)


def main(args=None) -> int:
    import pyllm

    info = pyllm.build_info()
    print(f"pyllm {getattr(pyllm, '__version__', '?')} at {pyllm.__file__}; torch {torch.__version__}; "
          f"native {'loaded' if info['native_loaded'] else 'NOT loaded: ' + str(info['native_error'])}; "
          f"emulated {'loaded' if info['emulated_loaded'] else 'not loaded'}; CUDA kernels "
          f"{'built for ' + info['cuda_archs'] if info['with_cuda'] else 'not built'}")
    if not info["native_loaded"]:
        return 1
    devices = ["cpu"] + (["cuda"] if info["with_cuda"] and torch.cuda.is_available() else [])
    failed = 0
    with pyllm.use_backend("native"):
        for device in devices:
            for spec in pyllm.ops.specs():
                t = time.perf_counter()
                try:
                    n = check_op(spec, device)
                    print(f"  ok    {device:4s} {spec.name}: {n} samples ({time.perf_counter() - t:.1f} s)")
                except Exception as e:  # report every op, then fail
                    failed += 1
                    print(f"  FAIL  {device:4s} {spec.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
    print("selftest passed" if not failed else f"selftest FAILED: {failed} op(s)")
    return 1 if failed else 0
