"""Public functional API, mirroring torch.nn.functional's signatures.

Each function validates its arguments (errors name the argument and what was
expected), picks an implementation through the backend registry
(:mod:`pyllm.backends`) and calls either a native op (``torch.ops.pyllm.*``) or the
PyTorch reference (:mod:`pyllm.reference`).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import _ext, _ops  # noqa: F401  (registers fakes and autograd)
from . import reference as ref
from . import backends as _backends
from .backends import current_backend, select

_GPU_MAX_HEAD_DIM = 256

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)

__all__ = ["layer_norm", "add_layer_norm", "rms_norm", "masked_softmax"]


# --------------------------------------------------------------------------- checks
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyllm: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"pyllm: {name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def _check_same_device(t, name: str, ref_t, ref_name: str = "input") -> None:
    if t.device != ref_t.device:
        raise ValueError(f"pyllm: {name} is on {t.device} but {ref_name} is on {ref_t.device}; "
                         "move them to the same device")


def _normalized(input, normalized_shape) -> tuple:
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


def _check_eps(eps, allow_none: bool = False) -> None:
    if eps is None and allow_none:
        return
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"pyllm: eps must be a Python number{' or None' if allow_none else ''}, "
                        f"got {type(eps).__name__}")


def _check_param(p, name: str, input, shape: tuple) -> None:
    if p is None:
        return
    _check_float(p, name)
    _check_same_device(p, name, input)
    if tuple(p.shape) != shape:
        raise ValueError(f"pyllm: {name} must have shape {list(shape)} (normalized_shape), "
                         f"got {list(p.shape)}")


def _flat(input, shape):
    """View the normalized dims as one: [*lead, prod(shape)]."""
    if len(shape) == 1:
        return input
    return input.reshape(*input.shape[: input.dim() - len(shape)], math.prod(shape))


def _flat_param(p, shape):
    return None if p is None or len(shape) == 1 else p.reshape(-1)


def _run(op, grad_inputs, *args):
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


def _broadcastable_to(shape, target) -> bool:
    """True if `shape` broadcasts to exactly `target` (torch.broadcast_shapes is ~100 us a call)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))


def _use_kernel(ns, *tensors) -> bool:
    return ns is not None and all(t is None or t.dtype in _KERNEL_DTYPES for t in tensors)


# --------------------------------------------------------------------------- ops
def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims, as ``F.layer_norm``.

    fp32 accumulation for fp16/bf16; output in the input's dtype.
    """
    _check_float(input, "input")
    shape = _normalized(input, normalized_shape)
    _check_param(weight, "weight", input, shape)
    _check_param(bias, "bias", input, shape)
    _check_eps(eps)
    x = _flat(input, shape)
    w = weight if len(shape) == 1 else _flat_param(weight, shape)
    b = bias if len(shape) == 1 else _flat_param(bias, shape)
    ns = select("layer_norm", input, weight, bias)
    if _use_kernel(ns, input, weight, bias):
        out = _run(ns.layer_norm, (input, weight, bias), x, w, b, float(eps))[0]
    else:
        out = ref.layer_norm(x, w, b, eps)[0]
    return out.view(input.shape) if len(shape) > 1 else out


def add_layer_norm(input: torch.Tensor, residual: torch.Tensor,
                   normalized_shape: Union[int, Sequence[int]],
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + LayerNorm: returns ``(layer_norm(input + residual), input + residual)``.

    The sum is rounded to the input dtype before normalizing, exactly like
    ``s = input + residual; F.layer_norm(s, ...)``, but in one pass over memory.
    """
    _check_float(input, "input")
    _check_float(residual, "residual")
    _check_same_device(residual, "residual", input)
    if residual.shape != input.shape:
        raise ValueError(f"pyllm: residual must have the input's shape {list(input.shape)}, "
                         f"got {list(residual.shape)} (no broadcasting)")
    if residual.dtype != input.dtype:
        raise TypeError(f"pyllm: residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    shape = _normalized(input, normalized_shape)
    _check_param(weight, "weight", input, shape)
    _check_param(bias, "bias", input, shape)
    _check_eps(eps)
    x, r = _flat(input, shape), _flat(residual, shape)
    w = weight if len(shape) == 1 else _flat_param(weight, shape)
    b = bias if len(shape) == 1 else _flat_param(bias, shape)
    ns = select("add_layer_norm", input, residual, weight, bias)
    if _use_kernel(ns, input, weight, bias):
        out, summed = _run(ns.add_layer_norm, (input, residual, weight, bias), x, r, w, b, float(eps))[:2]
    else:
        out, summed = ref.add_layer_norm(x, r, w, b, eps)[:2]
    if len(shape) > 1:
        out, summed = out.view(input.shape), summed.view(input.shape)
    return out, summed


RMS_STYLES = ("torch", "llama", "t5", "gemma")


def _rms_style(style: str, x_dtype, w_dtype):
    """(round_dtype, weight_offset, out_dtype) reproducing each library's casting."""
    halves = (torch.float16, torch.bfloat16)
    if style == "torch":  # F.rms_norm: all fp32, cast once
        return None, 0.0, x_dtype
    if style == "llama":  # weight * normalized.to(input_dtype)
        out = torch.promote_types(w_dtype, x_dtype) if w_dtype is not None else x_dtype
        return (x_dtype if x_dtype in halves else None), 0.0, out
    if style == "t5":  # normalized.to(weight.dtype) if weight is half; weight * normalized
        if w_dtype in halves:
            return w_dtype, 0.0, w_dtype
        return None, 0.0, (torch.promote_types(w_dtype, torch.float32) if w_dtype is not None else torch.float32)
    if style == "gemma":  # (normalized * (1 + weight)).type_as(input), all fp32
        return None, 1.0, x_dtype
    raise ValueError(f"pyllm: style must be one of {RMS_STYLES}, got {style!r}")


def rms_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]],
             weight: Optional[torch.Tensor] = None, eps: Optional[float] = None, *,
             style: str = "torch") -> torch.Tensor:
    """RMS normalization over the trailing dims, as ``F.rms_norm`` (``style="torch"``).

    ``style`` reproduces other libraries' casting exactly: ``"llama"`` (Hugging Face
    LlamaRMSNorm/MistralRMSNorm: round the normalized value to the input dtype, then
    multiply by the weight), ``"t5"`` (T5LayerNorm: round to a half weight's dtype),
    ``"gemma"`` (multiply by ``1 + weight`` in fp32). ``eps=None`` means
    ``torch.finfo(float32).eps`` like torch.
    """
    _check_float(input, "input")
    shape = _normalized(input, normalized_shape)
    _check_param(weight, "weight", input, shape)
    _check_eps(eps, allow_none=True)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    round_dtype, offset, out_dtype = _rms_style(style, input.dtype, None if weight is None else weight.dtype)
    x = _flat(input, shape)
    w = weight if len(shape) == 1 else _flat_param(weight, shape)
    ns = select("rms_norm", input, weight)
    if _use_kernel(ns, input, weight) and out_dtype in _KERNEL_DTYPES:
        out = _run(ns.rms_norm, (input, weight), x, w, float(eps), round_dtype, float(offset), out_dtype)[0]
    else:
        out = ref.rms_norm(x, w, eps, round_dtype, offset, out_dtype)[0]
    return out.view(input.shape) if len(shape) > 1 else out


def masked_softmax(input: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0,
                   causal: bool = False) -> torch.Tensor:
    """``softmax(input * scale + mask)`` over the last dim, in one pass.

    ``mask``: bool (True = keep, as SDPA) or an additive float mask, broadcastable to
    ``input`` with any strides (never materialized). ``causal=True`` hides keys after the
    query (top-left alignment, as SDPA's ``is_causal``; query index = ``input``'s dim -2).
    A row with every key masked gives zeros, never NaN. No length limits.
    """
    _check_float(input, "input")
    if input.dim() == 0:
        raise ValueError("pyllm: input must have at least 1 dimension, got a scalar")
    if causal and input.dim() < 2:
        raise ValueError(f"pyllm: causal=True needs input with at least 2 dims [..., Lq, Lk], "
                         f"got shape {list(input.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"pyllm: scale must be a Python number, got {type(scale).__name__}")
    if mask is not None:
        _check_tensor(mask, "mask")
        if mask.dtype != torch.bool and mask.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"pyllm: mask must be bool (True = keep) or a floating additive mask, "
                            f"got {mask.dtype}")
        _check_same_device(mask, "mask", input)
        if not _broadcastable_to(mask.shape, input.shape):
            raise ValueError(f"pyllm: mask of shape {list(mask.shape)} is not broadcastable to "
                             f"input of shape {list(input.shape)}")
    ns = select("masked_softmax", input, mask)
    if _use_kernel(ns, input, mask if (mask is not None and mask.dtype != torch.bool) else None):
        return _run(ns.masked_softmax, (input, mask), input, mask, float(scale), bool(causal))
    return ref.masked_softmax(input, mask, scale, causal)


def _check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          causal_alignment, sliding_window):
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_float(t, name)
    for t, name in ((key, "key"), (value, "value")):
        _check_same_device(t, name, query, "query")
        if t.dtype != query.dtype:
            raise TypeError(f"pyllm: {name} must have query's dtype {query.dtype}, got {t.dtype}")
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"pyllm: query, key and value must have the same rank >= 3 ([..., H, L, D]); got shapes "
            f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"pyllm: batch dims differ: query {list(query.shape)}, key {list(key.shape)}, "
                         f"value {list(value.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"pyllm: query and key head dims differ ({query.shape[-1]} vs {key.shape[-1]})")
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(f"pyllm: key {list(key.shape)} and value {list(value.shape)} must agree on "
                         f"heads and length")
    hq, hk = query.shape[-3], key.shape[-3]
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"pyllm: query has {hq} heads but key/value have {hk}; pass "
                             f"enable_gqa=True for grouped-query attention")
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"pyllm: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"pyllm: dropout_p must be in [0, 1), got {dropout_p}")
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"pyllm: causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}")
    if sliding_window is not None:
        if (not isinstance(sliding_window, (tuple, list)) or len(sliding_window) != 2
                or not all(isinstance(w, int) for w in sliding_window)):
            raise TypeError(f"pyllm: sliding_window must be a (left, right) pair of ints (-1 = unbounded), "
                            f"got {sliding_window!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"pyllm: scale must be a Python number or None, got {type(scale).__name__}")
    if attn_mask is not None:
        _check_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"pyllm: attn_mask must be bool (True = attend) or a floating additive mask, "
                            f"got {attn_mask.dtype}")
        _check_same_device(attn_mask, "attn_mask", query, "query")
        full = (*query.shape[:-1], key.shape[-2])
        if not _broadcastable_to(attn_mask.shape, full):
            raise ValueError(f"pyllm: attn_mask of shape {list(attn_mask.shape)} is not broadcastable to "
                             f"the scores' shape {list(full)} ([..., Hq, Lq, Lk])")


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, causal_alignment: str = "top_left",
                                 sliding_window: Optional[tuple] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` ([..., H, L, D]).

    Differences and extras: a query whose keys are all masked gets zeros, never NaN;
    ``causal_alignment="bottom_right"`` aligns the causal mask to the end of the keys
    (decoding with a KV cache, Lq < Lk); ``sliding_window=(left, right)`` restricts each
    query to nearby keys (-1 = unbounded). Masks may have any broadcastable shape/strides.
    """
    _check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          causal_alignment, sliding_window)
    ns = select("scaled_dot_product_attention", query, key, value, attn_mask)
    kernel = getattr(ns, "attention", None) if ns is not None else None
    dmax = max(query.shape[-1], value.shape[-1])
    if kernel is not None and dmax > _GPU_MAX_HEAD_DIM and query.device.type != "cpu" and current_backend() == "auto":
        # The CUDA kernel keeps a row of the output in registers (head dims <= 256).
        _backends._LAST["scaled_dot_product_attention"] = (
            "auto", f"reference (PyTorch) because head dim {dmax} > {_GPU_MAX_HEAD_DIM} (CUDA kernel limit)")
        kernel = None
    if kernel is not None and _use_kernel(ns, query, key, value):
        return _attention_kernel(ns, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 causal_alignment, sliding_window)
    return ref.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa, causal_alignment, sliding_window)


def _attention_kernel(ns, query, key, value, attn_mask, dropout_p, is_causal, scale, causal_alignment,
                      sliding_window):
    """Runs ``ns.attention`` on [B, H, L, D] views of the arguments (leading dims flattened)."""
    lead = query.shape[:-3]
    hq, lq, d = query.shape[-3:]
    lk = key.shape[-2]
    mask = attn_mask
    if query.dim() != 4:
        b = math.prod(lead)
        q = query.reshape(b, hq, lq, d)
        k = key.reshape(b, *key.shape[-3:])
        v = value.reshape(b, *value.shape[-3:])
        if mask is not None:
            # Leading dims of the mask broadcast over the flattened batch: a view when they
            # merge (the usual case), else one copy of the mask at the scores' size.
            mask = mask.expand(*lead, hq, lq, lk).reshape(b, hq, lq, lk) if query.dim() > 4 else mask
    else:
        q, k, v = query, key, value
    if mask is not None and mask.dtype == torch.float64:
        mask = mask.float()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    wl, wr = (-1, -1) if sliding_window is None else (int(sliding_window[0]), int(sliding_window[1]))
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
    out = _run(ns.attention, (q, k, v, mask), q, k, v, mask, scale, bool(is_causal), causal_alignment == "bottom_right", wl, wr,
                       float(dropout_p), seed)[0]
    return out.reshape(*lead, hq, lq, value.shape[-1])


__all__ += ["scaled_dot_product_attention"]
