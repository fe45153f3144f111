"""Recognize Hugging Face normalization modules and build pyllm replacements sharing their Parameters.

A module is recognized by what it computes, not by its name: ``torch.nn.LayerNorm`` /
``torch.nn.RMSNorm`` by exact type, and Hugging Face's RMSNorm classes when their ``forward`` (and
helper) source is the same program (same syntax tree, comments and docstrings ignored) as one of the
reference implementations whose casting pyllm reproduces: ``LlamaRMSNorm`` (style "llama": also
Mistral, Qwen2, ... which copy it), ``T5LayerNorm`` (style "t5") and ``GemmaRMSNorm`` (style "gemma").
A class that subclasses or edits any of these is left alone and reported, never guessed.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Optional

import torch

from .. import nn as pnn

# style -> (module path, class name, attribute holding eps, helper methods that must match too)
_REFERENCES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "variance_epsilon", ()),
    "t5": ("transformers.models.t5.modeling_t5", "T5LayerNorm", "variance_epsilon", ()),
    "gemma": ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", "eps", ("_norm",)),
}


def _program(fn) -> Optional[str]:
    """Normalized syntax tree of a function (args and body; no docstring, comments, annotations)."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        node = ast.parse(src).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    args = [a.arg for a in node.args.args]
    return repr(args) + "".join(ast.dump(b, annotate_fields=True, include_attributes=False) for b in body)


def _class_program(cls, methods) -> Optional[tuple]:
    progs = []
    for m in ("forward",) + tuple(methods):
        fn = getattr(cls, m, None)
        if fn is None:
            return None
        p = _program(fn)
        if p is None:
            return None
        progs.append(p)
    return tuple(progs)


_reference_programs: Optional[dict] = None
_class_cache: dict = {}


def _references() -> dict:
    global _reference_programs
    if _reference_programs is None:
        import importlib

        progs = {}
        for style, (mod, name, eps_attr, methods) in _REFERENCES.items():
            try:
                cls = getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
            prog = _class_program(cls, methods)
            if prog is not None:
                progs[style] = (prog, eps_attr, methods)
        _reference_programs = progs
    return _reference_programs


def hf_rms_style(cls) -> Optional[tuple]:
    """``(style, eps_attribute)`` if ``cls`` computes exactly one of the reference RMSNorms, else None."""
    if cls in _class_cache:
        return _class_cache[cls]
    found = None
    if issubclass(cls, torch.nn.Module) and not issubclass(cls, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        for style, (prog, eps_attr, methods) in _references().items():
            if _class_program(cls, methods) == prog:
                found = (style, eps_attr)
                break
    _class_cache[cls] = found
    return found


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or m._state_dict_hooks
                or m._load_state_dict_pre_hooks)


# Modules named like a norm that compute something else: not reported as "left unchanged".
_NOT_NORMS = {("sentence_transformers", "Normalize")}  # L2 normalization of the sentence embedding


def plan(m: torch.nn.Module):
    """How to switch ``m`` to pyllm: ``("class", new_class, extra_attrs)``, ``("replace", new_module)``,
    ``("skip", reason)`` for a norm-like module that is not handled, or None (not a norm)."""
    t = type(m)
    if t is torch.nn.LayerNorm:
        return ("class", pnn.LayerNorm, {})
    if t is torch.nn.RMSNorm:
        return ("class", pnn.RMSNorm, {"style": "torch"})
    if t in (pnn.LayerNorm, pnn.RMSNorm):
        return None  # already pyllm
    if (t.__module__.split(".")[0], t.__name__) in _NOT_NORMS:
        return None
    rec = hf_rms_style(t)
    if rec is None:
        return ("skip", "not a recognized normalization") if "norm" in t.__name__.lower() else None
    style, eps_attr = rec
    params = dict(m.named_parameters(recurse=False))
    w = params.get("weight")
    if (set(params) != {"weight"} or w is None or w.dim() != 1 or len(list(m.children()))
            or len(list(m.buffers(recurse=False))) or not isinstance(getattr(m, eps_attr, None), (int, float))):
        return ("skip", f"{t.__name__} matches the {style!r} RMSNorm program but has unexpected state")
    if _has_hooks(m):
        return ("skip", f"{t.__name__} has hooks registered on it")
    new = pnn.RMSNorm(w.shape[0], eps=float(getattr(m, eps_attr)), device="meta", style=style)
    new.weight = w  # the same Parameter object: training, state_dict and tying are unaffected
    new.train(m.training)
    return ("replace", new)
