"""Loads the native extension modules defensively.

If ``pyllm._C`` is missing, fails to load (corrupt file, missing symbol) or was built against
another torch than the one running, pyllm warns once with the reason and the exact rebuild
command and keeps working on the pure-PyTorch reference. ``PYLLM_REQUIRE_EXT=1`` (set in CI)
turns that into an ImportError with the same message; ``PYLLM_DISABLE_EXT=1`` skips native code
on purpose.

The torch version is checked *before* the shared library is loaded, from the ``_build.json``
that the build writes next to it (setup.py's build_ext), so an extension built for another torch
is never dlopen'ed into this one (an ABI mismatch can crash at load time rather than raise); the
version the module itself reports is checked again after loading.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import warnings

_PKG = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PKG)


def rebuild_command() -> str:
    """The exact command that rebuilds the extension for the running Python and torch."""
    if os.path.exists(os.path.join(_ROOT, "setup.py")):
        return f"cd {_ROOT} && {sys.executable} -m pip install --no-build-isolation --no-deps -e ."
    return (f"{sys.executable} -m pip install --no-build-isolation --force-reinstall --no-deps "
            "<path to the pyllm checkout>  (setup.py imports torch: no build isolation)")


FIX = f"rebuild it against the torch you run now: {rebuild_command()}"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _built_for() -> str | None:
    """The torch version recorded by the build, or None when there is no record."""
    try:
        with open(os.path.join(_PKG, "_build.json")) as f:
            return str(json.load(f)["torch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load(modname: str, required_env: str | None):
    """(module or None, reason or None)."""
    if _truthy("PYLLM_DISABLE_EXT"):
        return None, "disabled by PYLLM_DISABLE_EXT=1"
    import torch  # loads libc10/libtorch that the extension links against

    reason, err = None, None
    try:
        if importlib.util.find_spec(modname) is None:
            reason = f"{modname} is not built (no shared library in {_PKG})"
        else:
            built = _built_for()
            if built is not None and built != torch.__version__:
                reason = f"{modname} was built against torch {built}, but torch {torch.__version__} is running"
            else:
                mod = importlib.import_module(modname)
                got = getattr(mod, "torch_version", None)
                if got is not None and got != torch.__version__:
                    reason = f"{modname} was built against torch {got}, but torch {torch.__version__} is running"
                else:
                    return mod, None
    except Exception as e:  # ImportError (corrupt file, undefined symbol), OSError, ...
        reason, err = f"{type(e).__name__}: {e}", e
    if required_env and _truthy(required_env):
        raise ImportError(f"pyllm: could not load {modname} ({reason}); {FIX}") from err
    return None, reason


C, C_ERROR = _load("pyllm._C", "PYLLM_REQUIRE_EXT")
if C is None and C_ERROR and not C_ERROR.startswith("disabled"):
    # Once per process: this module runs once; its warning names the fix.
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
