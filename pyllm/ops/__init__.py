"""The op registry: one :class:`OpSpec` per op, each defined in its own slice.

An op's slice is one module here (``pyllm/ops/<name>.py``) plus its kernel files
(``csrc/cpu/<name>.cpp``, ``csrc/cuda/<name>.cu``). The module holds everything about the op
above the kernels: the native schemas, the pure-PyTorch reference, the public wrapper (with
its argument checks and backend decision), the fake (meta) functions and the autograd
formulas, the kernel limits, sample inputs for the generic test suites, and its benchmark
cases. The kernel files register their own implementations with ``TORCH_LIBRARY_IMPL``.

Adding an op is one slice plus one line in :data:`SLICES`. Everything generic iterates over
:func:`specs`: schema definition and fake/autograd registration for every loaded namespace,
opcheck, the device tests, error tests, the sanitizer run and the benchmark.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import _ext

# The registry: one module per slice, in the order the docs and the bench list them.
SLICES = ("layer_norm", "rms_norm", "masked_softmax", "attention", "varlen_attention", "bias_gelu")

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Sample:
    """Arguments for one call of an op's public function: ``spec.functional(*args, **kwargs)``;
    the tensors that should carry a gradient have ``requires_grad`` set."""
    args: tuple
    kwargs: dict = field(default_factory=dict)
    desc: str = ""

    def __repr__(self) -> str:
        return f"Sample({self.desc})" if self.desc else "Sample(...)"


@dataclass(frozen=True)
class BadInput:
    """A call of the public function that must raise ``error`` with a message matching ``match``."""
    call: Callable[[], object]
    error: type
    match: str
    desc: str = ""


@dataclass
class BenchCase:
    """One benchmark case: the pyllm call and its baselines (first = the correctness reference),
    with the ideal bytes moved (and FLOPs) for the GB/s and GFLOP/s columns and optional speed
    targets per baseline. Built by an op's ``bench_cases``; timed by ``pyllm.tools.bench``."""
    op: str
    case: str
    shape: str
    dtype: torch.dtype
    candidate: Callable
    baselines: dict  # name -> callable (first = correctness reference)
    bytes: int
    flops: Optional[float] = None
    tol: float = 1e-4
    targets: dict = field(default_factory=dict)  # baseline name -> minimum speedup


@dataclass(frozen=True)
class Limits:
    """What the kernels of an op accept; anything else runs the reference (backend ``auto``)
    or raises (backend ``native``). ``check(decision_device, *args) -> reason | None`` adds
    op-specific limits (e.g. the CUDA attention head dim)."""
    dtypes: tuple = KERNEL_DTYPES
    check: Optional[Callable] = None
    notes: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str                       # public name in pyllm.functional
    functional: Callable            # the public wrapper
    reference: Callable             # the pure-PyTorch spec/fallback/oracle (public-API signature)
    torch_baseline: Callable        # plain torch composition with the public signature (test baseline)
    schemas: dict                   # native op name -> schema (without the name)
    register: Callable[[str, object], None]  # (namespace, ops object) -> registers fakes + autograd
    native_samples: Callable[[], dict]        # {native op: [arg tuples]} on CPU tensors, for opcheck
    samples: Callable[..., list]    # (device, dtype, requires_grad) -> [Sample]
    bad_inputs: Callable[[], list]  # -> [BadInput]
    bench_cases: Callable[..., list]  # (dtype, device, quick) -> [BenchCase]
    limits: Limits = Limits()
    kernels: tuple = ()             # the kernel source files (csrc/...), for docs and info


_SPECS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _SPECS:
        raise ValueError(f"pyllm: op {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def specs() -> list[OpSpec]:
    """Every registered op, in registry order."""
    _load_slices()
    return list(_SPECS.values())


def get(name: str) -> OpSpec:
    _load_slices()
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"pyllm: no op {name!r}; registered: {list(_SPECS)}") from None


def native_ops() -> dict:
    """{native op name: OpSpec} over every slice (forward and backward ops)."""
    return {n: s for s in specs() for n in s.schemas}


_LOADED = False
_LIBS: list = []  # torch.library.Library objects must stay alive


def _load_slices() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in SLICES:
        importlib.import_module(f"{__name__}.{name}")
    for ns, loaded in (("pyllm", _ext.HAS_C), ("pyllm_emu", _ext.HAS_EMU)):
        if loaded:
            _define_namespace(ns)


def _define_namespace(ns: str) -> None:
    """Defines every op's schemas in ``ns`` (the kernels registered their implementations when
    the extension module loaded) and registers the fakes and autograd formulas."""
    lib = torch.library.Library(ns, "FRAGMENT")
    _LIBS.append(lib)
    for spec in _SPECS.values():
        for op, schema in spec.schemas.items():
            lib.define(f"{op}{schema}")
    ops = getattr(torch.ops, ns)
    for spec in _SPECS.values():
        spec.register(ns, ops)


def namespaces() -> list[str]:
    """The op namespaces defined in this process (``pyllm``, ``pyllm_emu``)."""
    _load_slices()
    return [ns for ns, loaded in (("pyllm", _ext.HAS_C), ("pyllm_emu", _ext.HAS_EMU)) if loaded]


_load_slices()
