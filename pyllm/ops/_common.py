"""Helpers shared by the op slices: argument checks (errors name the argument and what was
expected), the call below the autograd layer, and small tensor utilities for fakes."""
from __future__ import annotations

import math
import numbers

import torch

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


def check_number(v, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"pyllm: {name} must be a Python number{' or None' if allow_none else ''}, "
                        f"got {type(v).__name__}")


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


def normalized(input, normalized_shape) -> tuple:
    if isinstance(normalized_shape, (str, bytes)):
        raise TypeError(f"pyllm: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}")
    if isinstance(normalized_shape, int):
        shape = (normalized_shape,)
    else:
        try:
            shape = tuple(int(s) for s in normalized_shape)
        except TypeError:
            raise TypeError(f"pyllm: normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
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
