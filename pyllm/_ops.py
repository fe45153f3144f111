"""Fake (meta) implementations and autograd for every native op, registered once per
op namespace (``pyllm`` for native kernels, ``pyllm_emu`` for emulated CUDA kernels).

The schemas themselves are declared in csrc/registration.cpp.
"""
from __future__ import annotations

import torch

from . import _ext


def _empty(shape, like, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _param_grad(x, weight):
    n = x.shape[-1]
    return _empty((n,), x, weight.dtype) if weight is not None else _empty((0,), x)


def _register(ns: str) -> None:
    lib = getattr(torch.ops, ns)

    # ---------------------------------------------------------------- fakes
    @torch.library.register_fake(f"{ns}::layer_norm")
    def _(x, weight, bias, eps):
        return _empty(x.shape, x), _empty(x.shape[:-1], x, torch.float32), _empty(x.shape[:-1], x, torch.float32)

    @torch.library.register_fake(f"{ns}::add_layer_norm")
    def _(x, residual, weight, bias, eps):
        torch._check(residual.shape == x.shape, lambda: "residual must have the input's shape")
        stat = _empty(x.shape[:-1], x, torch.float32)
        return _empty(x.shape, x), _empty(x.shape, x), stat, torch.empty_like(stat)

    @torch.library.register_fake(f"{ns}::layer_norm_backward")
    def _(grad_out, x, mean, rstd, weight, grad_extra):
        return _empty(x.shape, x), _param_grad(x, weight), _param_grad(x, weight)

    @torch.library.register_fake(f"{ns}::rms_norm")
    def _(x, weight, eps, round_dtype, weight_offset, out_dtype):
        return _empty(x.shape, x, out_dtype), _empty(x.shape[:-1], x, torch.float32)

    @torch.library.register_fake(f"{ns}::rms_norm_backward")
    def _(grad_out, x, rstd, weight, round_dtype, weight_offset):
        return _empty(x.shape, x), _param_grad(x, weight)

    @torch.library.register_fake(f"{ns}::masked_softmax")
    def _(x, mask, scale, causal):
        return _empty(x.shape, x)

    @torch.library.register_fake(f"{ns}::masked_softmax_backward")
    def _(grad_out, out, scale):
        return _empty(out.shape, out)

    # ------------------------------------------------------------- autograd
    def ln_setup(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def ln_backward(ctx, gy, _gmean, _grstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = lib.layer_norm_backward(gy, x, mean, rstd, weight, None)
        return (dx, dw if weight is not None else None,
                db.to(ctx.bias_dtype) if (weight is not None and ctx.has_bias) else _bias_only_grad(gy, ctx),
                None)

    def _bias_only_grad(gy, ctx):
        if not ctx.has_bias:
            return None
        return gy.float().reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)

    torch.library.register_autograd(f"{ns}::layer_norm", ln_backward, setup_context=ln_setup)

    def add_ln_setup(ctx, inputs, output):
        x, residual, weight, bias, eps = inputs
        _, summed, mean, rstd = output
        ctx.save_for_backward(summed, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def add_ln_backward(ctx, gy, gsummed, _gm, _gr):
        summed, weight, mean, rstd = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(summed)
        dx, dw, db = lib.layer_norm_backward(gy, summed, mean, rstd, weight, gsummed)
        db_out = db.to(ctx.bias_dtype) if (weight is not None and ctx.has_bias) else _bias_only_grad(gy, ctx)
        return dx, dx, dw if weight is not None else None, db_out, None

    torch.library.register_autograd(f"{ns}::add_layer_norm", add_ln_backward, setup_context=add_ln_setup)

    def rms_setup(ctx, inputs, output):
        x, weight, eps, round_dtype, offset, out_dtype = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.round_dtype, ctx.offset = round_dtype, offset

    def rms_backward(ctx, gy, _grstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = lib.rms_norm_backward(gy, x, rstd, weight, ctx.round_dtype, ctx.offset)
        return dx, dw if weight is not None else None, None, None, None, None

    torch.library.register_autograd(f"{ns}::rms_norm", rms_backward, setup_context=rms_setup)

    def sm_setup(ctx, inputs, output):
        x, mask, scale, causal = inputs
        ctx.save_for_backward(output)
        ctx.scale = scale
        ctx.mask_meta = None if mask is None else (mask.shape, mask.dtype)

    def sm_backward(ctx, gy):
        (y,) = ctx.saved_tensors
        dx = lib.masked_softmax_backward(gy, y, ctx.scale)
        dmask = None
        if ctx.needs_input_grad[1] and ctx.mask_meta is not None:
            shape, dtype = ctx.mask_meta
            # d(scores)/d(mask) = 1: the unscaled softmax gradient, reduced over broadcast dims.
            dmask = lib.masked_softmax_backward(gy, y, 1.0).sum_to_size(shape).to(dtype)
        return dx, dmask, None, None

    torch.library.register_autograd(f"{ns}::masked_softmax", sm_backward, setup_context=sm_setup)

    # ------------------------------------------------------------- attention
    @torch.library.register_fake(f"{ns}::attention")
    def _(q, k, v, mask, scale, causal, bottom_right, wl, wr, dropout_p, seed):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention expects 4-D q/k/v")
        b, hq, lq, _d = q.shape
        return _empty((b, hq, lq, v.shape[-1]), q), _empty((b, hq, lq), q, torch.float32)

    @torch.library.register_fake(f"{ns}::attention_backward")
    def _(gout, q, k, v, mask, out, lse, scale, causal, bottom_right, wl, wr, dropout_p, seed, mask_grad):
        b, hq, lq, _d = q.shape
        want = mask_grad and mask is not None and mask.dtype != torch.bool
        dmask = _empty((b, hq, lq, k.shape[-2]), q, torch.float32) if want else _empty((0,), q, torch.float32)
        return _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v), dmask

    def attn_setup(ctx, inputs, output):
        q, k, v, mask, scale, causal, bottom_right, wl, wr, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.args = (scale, causal, bottom_right, wl, wr, dropout_p, seed)

    def attn_backward(ctx, gout, _glse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        want_mask = bool(ctx.needs_input_grad[3]) and mask is not None and mask.dtype != torch.bool
        if gout is None:
            gout = torch.zeros_like(out)
        dq, dk, dv, dmask = lib.attention_backward(gout, q, k, v, mask, out, lse, *ctx.args, want_mask)
        dm = dmask.sum_to_size(mask.shape).to(mask.dtype) if want_mask else None
        return dq, dk, dv, dm, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::attention", attn_backward, setup_context=attn_setup)


if _ext.HAS_C:
    _register("pyllm")
if _ext.HAS_EMU:
    _register("pyllm_emu")
