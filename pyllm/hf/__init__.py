"""Hugging Face transformers integration.

``import pyllm.hf`` registers ``attn_implementation="pyllm"`` with transformers (attention function
and its mask function), so ``AutoModel.from_pretrained(path, attn_implementation="pyllm")`` works;
:func:`optimize` switches an already built model's attention *and* normalization modules to pyllm,
:func:`revert` restores it exactly; :func:`kernel_config` is a ``KernelConfig`` for
``from_pretrained(..., use_kernels=True, kernel_config=...)`` mapping transformers' kernel-replaceable
layers onto pyllm's layer package (:mod:`pyllm.hf.kernel_layers`). See docs/HF.md for the support matrix.
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("pyllm.hf needs the `transformers` package (pip install transformers)") from e

from .attention import NAME, attention_forward, register
from .kernel_mapping import PyllmKernelConfig, kernel_config
from .optimize import OptimizeReport, is_optimized, optimize, report, revert

register()

__all__ = ["NAME", "attention_forward", "register", "optimize", "revert", "is_optimized", "report", "OptimizeReport",
           "kernel_config", "PyllmKernelConfig"]
