"""Loads the native extension modules defensively.

If ``pyllm._C`` cannot be imported, pyllm warns once with the reason and a fix and
keeps working on the pure-PyTorch reference. ``PYLLM_REQUIRE_EXT=1`` (set in CI)
turns that into an error; ``PYLLM_DISABLE_EXT=1`` skips native code on purpose.
"""
from __future__ import annotations

import importlib
import os
import warnings

FIX = (
    "rebuild it with `pip install --no-build-isolation -e .` (or `make build`) in the pyllm "
    "checkout, against the torch you run now"
)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _load(modname: str, required_env: str | None):
    if _truthy("PYLLM_DISABLE_EXT"):
        return None, "disabled by PYLLM_DISABLE_EXT=1"
    try:
        import torch  # noqa: F401  (loads libc10/libtorch that the extension links against)

        return importlib.import_module(modname), None
    except Exception as e:  # ImportError, undefined symbol (ABI mismatch), ...
        reason = f"{type(e).__name__}: {e}"
        if required_env and _truthy(required_env):
            raise ImportError(f"pyllm: could not load {modname} ({reason}); {FIX}") from e
        return None, reason


C, C_ERROR = _load("pyllm._C", "PYLLM_REQUIRE_EXT")
if C is None and C_ERROR and not C_ERROR.startswith("disabled"):
    warnings.warn(
        f"pyllm: native kernels unavailable ({C_ERROR}); using the PyTorch reference "
        f"implementation. To fix: {FIX}.",
        RuntimeWarning,
        stacklevel=2,
    )
C_EMU, C_EMU_ERROR = _load("pyllm._C_emu", None)

HAS_C = C is not None
HAS_CUDA_KERNELS = bool(HAS_C and getattr(C, "with_cuda", False))
HAS_EMU = C_EMU is not None


def build_info() -> dict:
    """What was built and loaded: versions, archs, kernels, backends."""
    import torch

    info = {
        "torch_runtime": torch.__version__,
        "native_loaded": HAS_C,
        "native_error": C_ERROR,
        "emulated_loaded": HAS_EMU,
        "emulated_error": C_EMU_ERROR,
    }
    if HAS_C:
        info.update(
            torch_built=C.torch_version,
            with_cuda=bool(C.with_cuda),
            cuda_version=C.cuda_version,
            cuda_archs=C.cuda_archs,
            kernels=C.kernels.split(",") if C.kernels else [],
            compiler=getattr(C, "compiler", None),
        )
    return info
