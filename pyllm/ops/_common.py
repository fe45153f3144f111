"""Helpers shared by the op slices: argument checks (errors name the argument and what was
expected), the call below the autograd layer, and small tensor utilities for fakes."""
from __future__ import annotations

import math
import numbers
import operator

import torch

from .. import backends
from . import KERNEL_DTYPES

FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- checks
def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyllm: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(t, name: str) -> None:
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"pyllm: {name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def check_same_device(t, name: str, ref_t, ref_name: str = "input") -> None:
    if t.device != ref_t.device:
        raise ValueError(f"pyllm: {name} is on {t.device} but {ref_name} is on {ref_t.device}; "
                         "move them to the same device")


def check_residual(residual, input) -> None:
    """A residual of the fused add + norm ops: a float tensor of input's shape, dtype and device."""
    check_float(residual, "residual")
    check_same_device(residual, "residual", input)
    if residual.shape != input.shape:
        raise ValueError(f"pyllm: residual must have the input's shape {list(input.shape)}, "
                         f"got {list(residual.shape)} (no broadcasting)")
    if residual.dtype != input.dtype:
        raise TypeError(f"pyllm: residual must have the input's dtype {input.dtype}, got {residual.dtype}")


def check_number(v, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"pyllm: {name} must be a Python number{' or None' if allow_none else ''}, "
                        f"got {type(v).__name__}")


def check_finite(v, name: str, allow_none: bool = False, minimum=None) -> None:
    """A Python number (not a bool), finite, and ``>= minimum`` when given."""
    check_number(v, name, allow_none)
    if v is None:
        return
    if not math.isfinite(v):
        raise ValueError(f"pyllm: {name} must be a finite number, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"pyllm: {name} must be >= {minimum}, got {v}")


def check_flag(v, name: str) -> None:
    """A bool (Python or NumPy): a string, None or a number is a mistake, not a truth value."""
    if not (isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool"))):
        raise TypeError(f"pyllm: {name} must be a bool, got {type(v).__name__} {v!r}")


def check_int(v, name: str, minimum=None) -> int:
    """A Python (or NumPy, or one-element integer tensor) integer, not a bool; returns it as an int."""
    if isinstance(v, bool) or isinstance(getattr(v, "dtype", None), torch.dtype) and v.dtype == torch.bool:
        raise TypeError(f"pyllm: {name} must be an int, got a bool ({v!r})")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"pyllm: {name} must be an int, got {type(v).__name__} {v!r}") from None
    if minimum is not None and i < minimum:
        raise ValueError(f"pyllm: {name} must be >= {minimum}, got {i}")
    return i


# Windows at least this wide reach every key of any sequence: they mean "unbounded" (-1). Passing
# them on would overflow int64 in the kernels' position arithmetic (p + window + 1).
UNBOUNDED_WINDOW = 2**62


def check_window(window, name: str) -> tuple:
    """A (left, right) pair of ints, each -1 (unbounded) or >= 0; returns it with widths of at least
    :data:`UNBOUNDED_WINDOW` (which no sequence can tell from unbounded) replaced by -1."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"pyllm: {name} must be a (left, right) pair of ints (-1 = unbounded), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        w = int(w)
        if w < -1:
            raise ValueError(f"pyllm: {name} {side} width must be -1 (unbounded) or >= 0, got {w} "
                             f"(in {tuple(int(x) for x in window)})")
        out.append(-1 if w >= UNBOUNDED_WINDOW else w)
    return tuple(out)


def check_eps(eps, allow_none: bool = False) -> None:
    check_finite(eps, "eps", allow_none, minimum=0)


def local(t):
    """The rank-local tensor of a DTensor, ``t`` otherwise: for argument checks that read memory
    (data pointers) or values (``tolist``), which DTensors do not allow (docs/DISTRIBUTED.md)."""
    dt = backends.dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _byte_span(t) -> tuple:
    start = t.data_ptr()
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def check_writable(out, name: str, others: tuple) -> None:
    """For ops that write ``out`` in place: no two of its elements share memory (an expanded
    view), and it does not overlap the ``(tensor, name, alias_ok)`` tensors it reads, except as
    the very same view (``alias_ok``: read and written element by element)."""
    if out.device.type == "meta" or torch.compiler.is_compiling():
        return
    out, others = local(out), tuple((local(t), tname, ok) for t, tname, ok in others)
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"pyllm: {name} has elements that share memory (an expanded or stride-0 view, shape "
                         f"{list(out.shape)}, strides {list(out.stride())}); writing it in place would be "
                         f"undefined: pass {name}.clone() (or .contiguous())")
    if out.numel() == 0:
        return
    lo, hi = _byte_span(out)
    for t, tname, alias_ok in others:
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        if alias_ok and t.data_ptr() == out.data_ptr() and t.shape == out.shape and t.stride() == out.stride():
            continue
        tlo, thi = _byte_span(t)
        if tlo < hi and lo < thi:
            raise ValueError(f"pyllm: {tname} overlaps the memory of {name}, which is written in place; pass "
                             f"a copy ({tname}.clone())")


def check_mask(mask, name: str, keep_word: str, ref_t, ref_name: str, target_shape, target_desc: str) -> None:
    """A bool (True = ``keep_word``) or floating additive mask, on ``ref_t``'s device,
    broadcastable to ``target_shape`` (``target_desc`` names that shape in the error)."""
    check_tensor(mask, name)
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyllm: {name} must be bool (True = {keep_word}) or a floating additive mask, "
                        f"got {mask.dtype}")
    check_same_device(mask, name, ref_t, ref_name)
    if not broadcastable_to(mask.shape, target_shape):
        raise ValueError(f"pyllm: {name} of shape {list(mask.shape)} is not broadcastable to "
                         f"{target_desc} {list(target_shape)}")


def broadcastable_to(shape, target) -> bool:
    """True if `shape` broadcasts to exactly `target` (torch.broadcast_shapes is ~100 us a call)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))


def _dim(s) -> int:
    if isinstance(s, bool):  # True would silently mean a dim of size 1
        raise TypeError
    return operator.index(s)  # not int(): 8.5 must not become 8


def check_normalized_shape(normalized_shape) -> tuple:
    """An int or a sequence of ints (not bools, not floats) -> the tuple of dims."""
    if type(normalized_shape) is int:  # the common cases first: no per-call overhead
        return (normalized_shape,)
    if type(normalized_shape) in (tuple, torch.Size) and all(type(s) is int for s in normalized_shape):
        return tuple(normalized_shape)
    try:
        if isinstance(normalized_shape, (str, bytes)):
            raise TypeError
        if isinstance(normalized_shape, numbers.Integral):
            return (_dim(normalized_shape),)
        return tuple(_dim(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"pyllm: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None


def normalized(input, normalized_shape) -> tuple:
    shape = check_normalized_shape(normalized_shape)
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"pyllm: normalized_shape {list(shape)} must match the last dims of input "
                         f"of shape {list(input.shape)}")
    return shape


def check_param(p, name: str, input, shape: tuple) -> None:
    if p is None:
        return
    check_float(p, name)
    check_same_device(p, name, input)
    if tuple(p.shape) != shape:
        raise ValueError(f"pyllm: {name} must have shape {list(shape)} (normalized_shape), "
                         f"got {list(p.shape)}")


def flat(input, shape):
    """View the normalized dims as one: [*lead, prod(shape)]."""
    if len(shape) == 1:
        return input
    return input.reshape(*input.shape[: input.dim() - len(shape)], math.prod(shape))


def flat_param(p, shape):
    return p if p is None or len(shape) == 1 else p.reshape(-1)


# --------------------------------------------------------------------------- calling kernels
def run(op, grad_inputs, *args):
    """Calls a native op; when no gradient can flow, below the autograd layer.

    The ops' autograd is registered from Python (torch.library.register_autograd); going
    through it costs ~7 us per call even under no_grad, which dominates small decode-step
    ops. Inference mode and torch.compile already bypass or trace it.
    """
    if torch.compiler.is_compiling():  # first: dynamo cannot trace is_inference_mode_enabled()
        return op(*args)
    if torch.is_inference_mode_enabled() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# --------------------------------------------------------------------------- fakes
def empty(shape, like, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def param_grad(x, weight):
    n = x.shape[-1]
    return empty((n,), x, weight.dtype) if weight is not None else empty((0,), x)


def fmt_shape(s) -> str:
    return "[" + ", ".join(str(int(v)) for v in s) + "]"


# --------------------------------------------------------------------------- external baselines
def external_norm_baselines(kind: str, x, weight, bias, eps: float) -> dict:
    """The fused norm kernels of Apex and Liger-Kernel as extra bench baselines, where installed and
    where they run (CUDA tensors): ``{name: callable}``, empty otherwise. ``kind`` is "layer_norm"
    or "rms_norm" (Llama casting for Liger's RMSNorm, as pyllm's style "llama"). A library that
    imports but rejects the call (an API change) is left out, not reported as a time."""
    if not x.is_cuda:
        return {}
    d = x.shape[-1]
    found = {}
    try:
        from apex.normalization import fused_layer_norm as apex_ln
        if kind == "layer_norm":
            found["apex FusedLayerNorm"] = lambda: apex_ln.fused_layer_norm_affine(x, weight, bias, (d,), eps)
        else:
            found["apex FusedRMSNorm"] = lambda: apex_ln.fused_rms_norm_affine(x, weight, (d,), eps)
    except ImportError:
        pass
    try:
        if kind == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            found["liger LayerNorm"] = lambda: LigerLayerNormFunction.apply(x, weight, bias, eps)
        else:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            found["liger RMSNorm"] = lambda: LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama")
    except ImportError:
        pass
    usable = {}
    for name, fn in found.items():
        try:
            fn()
        except Exception:  # noqa: BLE001 - an incompatible version: leave the baseline out
            continue
        usable[name] = fn
    return usable
