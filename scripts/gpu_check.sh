#!/usr/bin/env bash
# The GPU-day check: builds pyllm for this GPU, runs the op tests on CUDA tensors,
# compute-sanitizer (memcheck, racecheck, synccheck) over every CUDA op, and the GPU
# benchmarks, and writes one markdown report. See pyllm/tools/gpu_check.py.
#
#   scripts/gpu_check.sh [REPORT.md]                 (default gpu_report.md)
#   PYLLM_GPU_CHECK_STAGES=build,tests scripts/gpu_check.sh     (a subset of stages)
#   PYLLM_GPU_CHECK_TESTS="tests/test_ops.py -k softmax" scripts/gpu_check.sh
#
# Exit status: 0 all stages passed, 1 a stage failed, 2 no CUDA device visible.
set -euo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu_report.md}"

if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
else
  PY=python3
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: $PY cannot import torch; run 'make venv' (or set PYTHON=...)" >&2
  exit 1
fi
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"

set +e
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pyllm gpu-check --report "$report"
rc=$?
set -e
case $rc in
  0) echo "gpu_check.sh: PASS; report: $report" ;;
  2) echo "gpu_check.sh: no CUDA device visible; nothing checked" ;;
  *) echo "gpu_check.sh: FAIL (exit $rc); report: $report" ;;
esac
exit $rc
