"""Exporting models built on pyllm: ``torch.export`` and ``torch.onnx.export`` (docs/HF.md, "Export").

* ``torch.export.export(model, args)`` needs nothing from here: every pyllm op is a custom op
  with a fake (meta) function, so the ExportedProgram keeps each one as a single node
  (``torch.ops.pyllm.layer_norm.default``, ...) and ``ep.module()(*args)`` runs the same kernels.
* ONNX has no translation for ``pyllm::*`` ops, so :func:`onnx_export` exports with the
  ``"torch"`` backend: every public pyllm function then runs its pure-PyTorch reference (the
  spec the kernels are tested against), which the dynamo exporter lowers to standard ONNX ops.
  This covers every registered op through the backend registry, with no per-op table; it is
  the same as ``with pyllm.use_backend("torch"): torch.onnx.export(model, ..., dynamo=True)``.

What does not export to ONNX (see :data:`ONNX_UNSUPPORTED`): ``varlen_attention``, whose
reference loops over the sequences of ``cu_seqlens`` read as Python ints (data-dependent
shapes). Models optimized by :func:`pyllm.hf.optimize` do not reach it under export: the
padding-free path (:mod:`pyllm.hf.padfree`) runs the stock padded path while exporting.

The dynamo exporter needs ``onnxscript`` (pinned in requirements.txt).
"""
from __future__ import annotations

from . import backends

# op name (pyllm.ops registry) -> why its reference does not export to ONNX today
ONNX_UNSUPPORTED = {
    "varlen_attention": "its reference slices each sequence at the values of cu_seqlens (data-dependent "
                        "shapes): torch.export fails with GuardOnDataDependentSymNode",
}


def onnx_export(model, args=(), f=None, *, kwargs=None, **options):
    """``torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, **options)`` with pyllm's
    ops lowered to their PyTorch references; returns the ``ONNXProgram``."""
    import torch

    with backends.use_backend("torch"):
        return torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, **options)
