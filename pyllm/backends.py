"""Backend registry: which implementation runs an op, decided as a value.

Backends (choose with env ``PYLLM_BACKEND`` or ``with pyllm.use_backend(name):``):

* ``auto`` (default) - native kernels (``torch.ops.pyllm``) when the extension is
  loaded, the tensors' device has kernels and the op's kernel limits (dtypes, head dims)
  accept the call; otherwise the PyTorch reference.
* ``native`` - native kernels or a clear error (no silent fallback, not even for fp64).
* ``torch`` - the pure-PyTorch reference (the spec).
* ``cuda-emulated`` - the CUDA kernel sources run on CPU tensors through the CPU
  emulation of CUDA (``torch.ops.pyllm_emu``); slow, for testing kernels without a GPU.
  Calls outside the kernels' limits run the reference (and say so).

:func:`select` returns a :class:`Decision` (path, kernel, reason); the ops act on it and
it is recorded, so ``pyllm.explain()``, :func:`last_decision`, the bench and the tests read
the same value.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import _ext


@dataclass(frozen=True)
class Decision:
    """Which implementation runs a call of ``op`` and why."""
    op: str
    backend: str                  # the backend that decided
    path: str                     # "native-cpu", "native-cuda", "cuda-emulated" or "reference"
    reason: str                   # why, in words (what explain() prints after "->")
    ns: Any = field(default=None, repr=False, compare=False)  # torch.ops namespace, None for the reference

    @property
    def uses_kernel(self) -> bool:
        return self.ns is not None

    @property
    def kernel(self) -> Optional[str]:
        """The native op namespace that runs (``pyllm`` / ``pyllm_emu``), None for the reference."""
        return None if self.ns is None else self.ns.name

    def __str__(self) -> str:
        return f"{self.op}: backend {self.backend!r} -> {self.reason}"


@dataclass
class Backend:
    name: str
    description: str
    # (op_name, tensors) -> (ops namespace or None for the reference, path, reason)
    select: Callable[[str, tuple], tuple]
    strict: bool = False  # True: a call outside the kernels' limits raises instead of falling back


_REGISTRY: dict[str, Backend] = {}
class _Local(threading.local):
    def __init__(self):
        self.stack: list[str] = []  # use_backend() nesting, per thread


_LOCAL = _Local()
_LAST: dict[str, Decision] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available_backends() -> list[str]:
    return list(_REGISTRY)


def _devices(tensors) -> set:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def _all_cpu(tensors) -> bool:
    return all(t.is_cpu for t in tensors if isinstance(t, torch.Tensor))  # is_cpu: no device object


def _native_ns(op, tensors, strict):
    if _ext.HAS_C and _all_cpu(tensors):
        return torch.ops.pyllm, "native-cpu", "native CPU kernel"
    devs = _devices(tensors)
    if not _ext.HAS_C:
        why = f"native extension not loaded ({_ext.C_ERROR})"
    elif devs <= {"cpu"}:
        return torch.ops.pyllm, "native-cpu", "native CPU kernel"
    elif devs == {"cuda"} and _ext.HAS_CUDA_KERNELS:
        return torch.ops.pyllm, "native-cuda", "native CUDA kernel"
    elif devs == {"cuda"}:
        why = "pyllm was built without CUDA kernels (CppExtension build)"
    else:
        why = f"no pyllm kernel for device(s) {sorted(devs)}"
    if strict:
        raise RuntimeError(f"pyllm: backend 'native' cannot run {op}: {why}")
    return None, "reference", f"reference (PyTorch) because {why}"


def _emulated_ns(op, tensors):
    if _ext.HAS_EMU and _all_cpu(tensors):
        return torch.ops.pyllm_emu, "cuda-emulated", "CUDA kernel under the CPU emulation"
    devs = _devices(tensors)
    if not _ext.HAS_EMU:
        raise RuntimeError(
            f"pyllm: backend 'cuda-emulated' is unavailable ({_ext.C_EMU_ERROR}); "
            "build with PYLLM_EMULATED=1 (the default)")
    if not devs <= {"cpu"}:
        raise RuntimeError(
            f"pyllm: backend 'cuda-emulated' runs CUDA kernels on CPU tensors; got {sorted(devs)}")
    return torch.ops.pyllm_emu, "cuda-emulated", "CUDA kernel under the CPU emulation"


register_backend(Backend("auto", "native kernels where available, else reference",
                         lambda op, t: _native_ns(op, t, strict=False)))
register_backend(Backend("native", "native kernels or an error",
                         lambda op, t: _native_ns(op, t, strict=True), strict=True))
register_backend(Backend("torch", "pure-PyTorch reference",
                         lambda op, t: (None, "reference", "reference (PyTorch) because backend is 'torch'")))
register_backend(Backend("cuda-emulated", "CUDA kernels under CPU emulation", _emulated_ns))


# The environment is read once, at import (torch.compile traces current_backend()).
_DEFAULT = os.environ.get("PYLLM_BACKEND", "auto") or "auto"
if _DEFAULT not in _REGISTRY:
    raise ValueError(f"PYLLM_BACKEND={_DEFAULT!r} is not one of {available_backends()}")


def current_backend() -> str:
    stack = _LOCAL.stack
    return stack[-1] if stack else _DEFAULT


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed pyllm calls on backend ``name`` (see module docstring). The choice is per
    thread: other threads keep theirs."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"pyllm: unknown backend {name!r}; choose one of {available_backends()}")
    stack = _LOCAL.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


_ONNX_REASON = ("reference (PyTorch) because torch.onnx.export is tracing: ONNX has no translation "
                "for pyllm ops, the reference lowers to standard ONNX ops")


def select(op: str, tensors: tuple, limits=None, limit_args: tuple = (), typed: Optional[tuple] = None) -> Decision:
    """Decides how ``op`` runs on ``tensors`` (None entries allowed) and records it.

    ``limits`` (a :class:`pyllm.ops.Limits`) are the kernels' limits: tensor dtypes, and an
    op-specific ``check(path, *limit_args) -> reason or None``; ``typed`` are the tensors whose
    dtype must be a kernel dtype (default: all of ``tensors``). Outside them the reference
    runs (backend ``auto``, ``cuda-emulated``) or a RuntimeError says why (``native``).
    """
    backend = _REGISTRY[current_backend()]
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        # ONNX has no translation for pyllm's native ops: while torch.onnx.export traces (through
        # torch.export), every backend runs the reference, which lowers to standard ONNX ops
        # (pyllm.export). is_exporting() first: the ONNX check costs ~3.5 us a call (imports).
        # Dynamo folds the ONNX check to False, so compiled graphs are unaffected.
        decision = Decision(op, backend.name, "reference", _ONNX_REASON, None)
        _record(decision)
        return decision
    ns, path, reason = backend.select(op, tensors)
    if ns is not None and limits is not None:
        why = None
        bad = [t.dtype for t in (tensors if typed is None else typed)
               if isinstance(t, torch.Tensor) and t.dtype not in limits.dtypes]
        if bad:
            why = (f"{_dname(bad[0])} has no kernel (kernels take "
                   f"{', '.join(_dname(d) for d in limits.dtypes)})")
        elif limits.check is not None:
            why = limits.check(path, *limit_args)
        if why is not None:
            if backend.strict:
                raise RuntimeError(f"pyllm: backend {backend.name!r} cannot run {op}: {why}")
            ns, path, reason = None, "reference", f"reference (PyTorch) because {why}"
    decision = Decision(op, backend.name, path, reason, ns)
    _guard_dtensors(op, tensors, decision)
    _record(decision)
    return decision


def dtensor_type():
    """``torch.distributed.tensor.DTensor`` when that module is loaded, else None (never imports it:
    without it no argument can be a DTensor)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def _guard_dtensors(op: str, tensors: tuple, decision: Decision) -> None:
    """DTensor inputs: the first one registers pyllm's sharding rules (``import pyllm.distributed``),
    so the native op runs shard-locally; the reference path raises (it is not shard-aware, and
    DTensor would all-gather a tensor sharded on the normalized dim). Free unless
    torch.distributed.tensor is imported; skipped while dynamo traces (it sees local tensors)."""
    dt = dtensor_type()
    if dt is None or torch.compiler.is_dynamo_compiling():
        return
    if not any(isinstance(t, dt) for t in tensors):
        return
    from . import distributed  # noqa: F401 - registers the rules on first import

    if decision.ns is None:
        distributed.check_reference(op, tensors, decision.reason)


def _record(decision: Decision) -> None:
    # Not while dynamo traces (torch.compile): a write to _LAST in the graph is a side effect that dynamo
    # replays on every call and guards on (the first new key recompiled the graph); a traced
    # decision is taken once, at trace time, so explain() reports the last eager call.
    if not torch.compiler.is_dynamo_compiling():
        _LAST[decision.op] = decision


def last_decision(op: str) -> Optional[Decision]:
    """The decision taken by the last call of ``op`` (None if not called yet)."""
    _check_op_name(op)
    return _LAST.get(op)


def _check_op_name(op) -> None:
    if not isinstance(op, str):
        raise TypeError(f"pyllm: op must be an op name (a str such as 'layer_norm'), got {type(op).__name__}")


def explain(op: str | None = None) -> str:
    """Why the last call of `op` (or of every op) took the path it did."""
    if op is not None:
        _check_op_name(op)
        return str(_LAST[op]) if op in _LAST else f"{op}: not called yet"
    return "\n".join(str(d) for d in _LAST.values()) or "no pyllm op called yet"
