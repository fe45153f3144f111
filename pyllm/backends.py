"""Backend registry: which implementation runs an op.

Backends (choose with env ``PYLLM_BACKEND`` or ``with pyllm.use_backend(name):``):

* ``auto`` (default) - native kernels (``torch.ops.pyllm``) when the extension is
  loaded and the tensors' device has kernels; otherwise the PyTorch reference.
* ``native`` - native kernels or a clear error (no silent fallback).
* ``torch`` - the pure-PyTorch reference (the spec).
* ``cuda-emulated`` - the CUDA kernel sources run on CPU tensors through the CPU
  emulation of CUDA (``torch.ops.pyllm_emu``); slow, for testing kernels without a GPU.

Every decision is recorded; ``pyllm.explain()`` tells why the last call of each op
took the path it did.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ext


@dataclass
class Backend:
    name: str
    description: str
    # (op_name, tensors) -> (ops namespace or None for the reference, reason)
    select: Callable[[str, tuple], tuple]


_REGISTRY: dict[str, Backend] = {}
_STACK: list[str] = []
_LAST: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available_backends() -> list[str]:
    return list(_REGISTRY)


def _devices(tensors) -> set:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def _native_ns(op, tensors, strict):
    devs = _devices(tensors)
    if not _ext.HAS_C:
        why = f"native extension not loaded ({_ext.C_ERROR})"
    elif devs <= {"cpu"}:
        return torch.ops.pyllm, "native CPU kernel"
    elif devs == {"cuda"} and _ext.HAS_CUDA_KERNELS:
        return torch.ops.pyllm, "native CUDA kernel"
    elif devs == {"cuda"}:
        why = "pyllm was built without CUDA kernels (CppExtension build)"
    else:
        why = f"no pyllm kernel for device(s) {sorted(devs)}"
    if strict:
        raise RuntimeError(f"pyllm: backend 'native' cannot run {op}: {why}")
    return None, f"reference (PyTorch) because {why}"


def _emulated_ns(op, tensors):
    devs = _devices(tensors)
    if not _ext.HAS_EMU:
        raise RuntimeError(
            f"pyllm: backend 'cuda-emulated' is unavailable ({_ext.C_EMU_ERROR}); "
            "build with PYLLM_EMULATED=1 (the default)")
    if not devs <= {"cpu"}:
        raise RuntimeError(
            f"pyllm: backend 'cuda-emulated' runs CUDA kernels on CPU tensors; got {sorted(devs)}")
    return torch.ops.pyllm_emu, "CUDA kernel under the CPU emulation"


register_backend(Backend("auto", "native kernels where available, else reference",
                         lambda op, t: _native_ns(op, t, strict=False)))
register_backend(Backend("native", "native kernels or an error",
                         lambda op, t: _native_ns(op, t, strict=True)))
register_backend(Backend("torch", "pure-PyTorch reference",
                         lambda op, t: (None, "reference (PyTorch) because backend is 'torch'")))
register_backend(Backend("cuda-emulated", "CUDA kernels under CPU emulation", _emulated_ns))


# The environment is read once, at import (torch.compile traces current_backend()).
_DEFAULT = os.environ.get("PYLLM_BACKEND", "auto") or "auto"
if _DEFAULT not in _REGISTRY:
    raise ValueError(f"PYLLM_BACKEND={_DEFAULT!r} is not one of {available_backends()}")


def current_backend() -> str:
    return _STACK[-1] if _STACK else _DEFAULT


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed pyllm calls on backend ``name`` (see module docstring)."""
    if name not in _REGISTRY:
        raise ValueError(f"pyllm: unknown backend {name!r}; choose one of {available_backends()}")
    _STACK.append(name)
    try:
        yield
    finally:
        _STACK.pop()


def select(op: str, *tensors):
    """Returns the ops namespace to call for `op` (None: use the reference)."""
    backend = _REGISTRY[current_backend()]
    ns, reason = backend.select(op, tensors)
    _LAST[op] = (backend.name, reason)  # formatted lazily by explain()
    return ns


def explain(op: str | None = None) -> str:
    """Why the last call of `op` (or of every op) took the path it did."""
    def line(name):
        backend, reason = _LAST[name]
        return f"{name}: backend {backend!r} -> {reason}"

    if op is not None:
        return line(op) if op in _LAST else f"{op}: not called yet"
    return "\n".join(line(name) for name in _LAST) or "no pyllm op called yet"
