"""Fused epilogues in Hugging Face layers: encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT, ...) and Llama-family decoders.

A module is recognized by its program, as :mod:`pyllm.hf.norms` recognizes norms: a class whose
``forward`` is the same syntax tree as

* ``BertSelfOutput.forward`` / ``BertOutput.forward`` (``LayerNorm(dropout(dense(h)) + input)``) runs
  ``dense`` and then :func:`pyllm.functional.add_layer_norm_`, which normalizes the residual sum
  **in place** in the linear layer's fresh output (no ``h + input`` temporary, no second fresh
  tensor). With autograd recording it runs the out-of-place :func:`~pyllm.functional.add_layer_norm`.
* ``BertIntermediate.forward`` (``act(dense(h))``) with a tanh-approximated GELU runs ``dense``
  without its bias and :func:`pyllm.functional.bias_gelu` (bias add + GELU in one pass). The exact
  (erf) GELU stays on ``addmm`` + torch's GELU: pyllm's erf GELU is slower than torch's on the
  CPUs measured (docs/PERFORMANCE.md), so fusing it would lose time; the report says so.

* ``LlamaDecoderLayer.forward`` (and every decoder layer with the same program: Mistral, Qwen2, ...)
  runs ``residual + attention output`` and ``post_attention_layernorm`` as one
  :func:`pyllm.functional.add_rms_norm` (the sum is written once and normalized from the same pass),
  when that norm is pyllm's RMSNorm (what :func:`pyllm.hf.optimize` puts there).

The fused forward is an instance attribute (the class is untouched); it runs the class's own
forward whenever its preconditions do not hold (training mode with dropout, hooks, a LayerNorm
or Linear that is not the plain one). :func:`disable` removes it.
"""
from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as TF

from .. import functional as PF
from .. import nn as pnn
from .norms import _class_program

_ORIG = "_pyllm_fused"

_REFS = {  # kind -> (module, class)
    "add_layer_norm": [("transformers.models.bert.modeling_bert", "BertSelfOutput"),
                       ("transformers.models.bert.modeling_bert", "BertOutput")],
    "bias_gelu": [("transformers.models.bert.modeling_bert", "BertIntermediate")],
    "add_rms_norm": [("transformers.models.llama.modeling_llama", "LlamaDecoderLayer")],
}
_programs = None
_cache: dict = {}


def _reference_programs():
    global _programs
    if _programs is None:
        import importlib

        _programs = {}
        for kind, refs in _REFS.items():
            for mod, name in refs:
                try:
                    cls = getattr(importlib.import_module(mod), name)
                except (ImportError, AttributeError):
                    continue
                prog = _class_program(cls, ())
                if prog is not None:
                    _programs[prog] = kind
    return _programs


def _kind(cls):
    if cls not in _cache:
        prog = _class_program(cls, ()) if issubclass(cls, torch.nn.Module) else None
        _cache[cls] = _reference_programs().get(prog) if prog is not None else None
    return _cache[cls]


def _plain(m) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _gelu_kind(act):
    """'none' (erf) or 'tanh' if ``act`` computes torch's GELU of that kind, else None."""
    from transformers import activations as A

    t = type(act)
    fn = getattr(act, "act", None)
    if t is A.GELUActivation and fn is TF.gelu:
        return "none"
    if t is getattr(A, "GELUTanh", None) and getattr(fn, "func", None) is TF.gelu \
            and getattr(fn, "keywords", None) == {"approximate": "tanh"}:
        return "tanh"
    if t is A.NewGELUActivation:
        return "tanh"  # the same function, written out in Python (rounding differs by ulps)
    if t is torch.nn.GELU:
        return act.approximate
    return None


def _grad_needed(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _add_ln_forward(self, hidden_states, input_tensor):
    ln, dense = self.LayerNorm, self.dense
    if (self.training and self.dropout.p > 0) or type(ln) not in _LAYER_NORMS or type(dense) is not torch.nn.Linear \
            or not (_plain(ln) and _plain(dense) and _plain(self.dropout)) or input_tensor.shape[-1] != ln.normalized_shape[-1]:
        return type(self).forward(self, hidden_states, input_tensor)
    h = dense(hidden_states)  # a fresh tensor: safe to overwrite
    if h.dtype != input_tensor.dtype or any(p is not None and p.dtype != h.dtype for p in (ln.weight, ln.bias)):
        return ln(h + input_tensor)  # mixed dtypes: the stock program on h (dropout is off here)
    if _grad_needed(h, input_tensor, ln.weight, ln.bias):
        return PF.add_layer_norm(h, input_tensor, ln.normalized_shape, ln.weight, ln.bias, ln.eps)[0]
    return PF.add_layer_norm_(h, input_tensor, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _bias_gelu_forward(self, hidden_states):
    dense, act = self.dense, self.intermediate_act_fn
    kind = _gelu_kind(act)
    if kind != "tanh" or type(dense) is not torch.nn.Linear or dense.bias is None \
            or not (_plain(dense) and _plain(act)):
        return type(self).forward(self, hidden_states)
    return PF.bias_gelu(TF.linear(hidden_states, dense.weight), dense.bias, approximate="tanh")


_signatures: dict = {}  # decoder layer class -> (names after hidden_states, their defaults)


def _layer_signature(cls) -> tuple:
    """The stock forward's parameters after ``(self, hidden_states)``: names in order and defaults.
    Read once per class with inspect (at enable time), outside any torch.compile trace."""
    if cls not in _signatures:
        params = list(inspect.signature(cls.forward).parameters.values())[2:]
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        defaults = {p.name: p.default for p in params
                    if p.name in names and p.default is not inspect.Parameter.empty}
        _signatures[cls] = (names, defaults)
    return _signatures[cls]


def _decoder_add_rms_forward(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward's program with ``residual + h`` and ``post_attention_layernorm(.)``
    as one add_rms_norm. The attention gets exactly the arguments the stock forward passes it
    (bound as inspect.Signature.bind would, in plain Python that torch.compile traces)."""
    norm = self.post_attention_layernorm
    if type(norm) is not pnn.RMSNorm or not _plain(norm) or len(norm.normalized_shape) != 1:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    names, defaults = _layer_signature(type(self))
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}.forward takes {len(names) + 2} positional arguments, "
                        f"got {len(args) + 2}")
    named = dict(defaults)
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
        named[name] = value
    named.update(kwargs)
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, **named)
    if h.dtype != residual.dtype or h.shape != residual.shape:  # the stock program (mixed dtypes)
        residual = residual + h
        h = norm(residual)
    else:
        h, residual = PF.add_rms_norm(h, residual, norm.normalized_shape, norm.weight, norm.eps, style=norm.style)
    h = self.mlp(h)
    return residual + h


_LAYER_NORMS = (torch.nn.LayerNorm, pnn.LayerNorm)  # what optimize() leaves in the layers


def plan(module):
    """``(kind, label)`` if ``module`` gets a fused forward, ``("skip", reason)`` if it is recognized but
    not fused, or None."""
    kind = _kind(type(module))
    if kind is None:
        return None
    name = type(module).__name__
    if kind == "bias_gelu":
        g = _gelu_kind(getattr(module, "intermediate_act_fn", None))
        if g == "none":
            return ("skip", f"{name}: bias + GELU(erf) left on addmm + torch's GELU "
                            f"(pyllm's erf GELU is slower than torch's on the CPU)")
        if g is None:
            return ("skip", f"{name}: activation {type(module.intermediate_act_fn).__name__} is not a GELU")
        return (kind, f"{name}: dense without bias -> pyllm bias_gelu(tanh)")
    if kind == "add_rms_norm":
        return (kind, f"{name}: residual + post_attention_layernorm -> pyllm add_rms_norm")
    return (kind, f"{name}: dense -> pyllm add_layer_norm_ (residual + LayerNorm, in place)")


_FORWARDS = {"add_layer_norm": _add_ln_forward, "bias_gelu": _bias_gelu_forward,
             "add_rms_norm": _decoder_add_rms_forward}


def enable(module, kind) -> None:
    fwd = _FORWARDS[kind]
    if kind == "add_rms_norm":
        _layer_signature(type(module))
    module.forward = types.MethodType(fwd, module)
    setattr(module, _ORIG, kind)


def disable(module) -> None:
    if hasattr(module, _ORIG):
        del module.forward
        delattr(module, _ORIG)


def is_enabled(module) -> bool:
    return hasattr(module, _ORIG)


__all__ = ["plan", "enable", "disable", "is_enabled"]
