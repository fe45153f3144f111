"""Exporting models built on pyllm: ``torch.export`` and ``torch.onnx.export`` (docs/HF.md, "Export").

* ``torch.export.export(model, args)`` needs nothing from here: every pyllm op is a custom op
  with a fake (meta) function, so the ExportedProgram keeps each one as a single node
  (``torch.ops.pyllm.layer_norm.default``, ...) and ``ep.module()(*args)`` runs the same kernels.
* ``torch.onnx.export(model, args, dynamo=True)`` works as it is: ONNX has no translation for
  ``pyllm::*`` ops, so while the ONNX exporter traces (``torch.onnx.is_in_onnx_export()``) every
  public pyllm function runs its pure-PyTorch reference (the spec the kernels are tested
  against; :func:`pyllm.backends.select` decides it for every backend, and ``pyllm.explain``
  says so), which the exporter lowers to standard ONNX ops. This covers every registered op
  through the backend decision, with no per-op table. :func:`onnx_export` is the same call with
  ``dynamo=True`` filled in.

What does not export to ONNX (see :data:`ONNX_UNSUPPORTED`): ``varlen_attention``, whose
reference loops over the sequences of ``cu_seqlens`` read as Python ints (data-dependent
shapes). Models optimized by :func:`pyllm.hf.optimize` do not reach it under export: the
padding-free path (:mod:`pyllm.hf.padfree`) runs the stock padded path while exporting.

The dynamo exporter needs ``onnxscript`` (pinned in requirements.txt).
"""
from __future__ import annotations

# op name (pyllm.ops registry) -> why its reference does not export to ONNX today
ONNX_UNSUPPORTED = {
    "varlen_attention": "its reference slices each sequence at the values of cu_seqlens (data-dependent "
                        "shapes): non-strict torch.export stops there, the exporter retries with dynamo "
                        "(which keeps the native op) and fails with \"No ONNX function found for "
                        "pyllm.varlen_attention\"",
}


def onnx_export(model, args=(), f=None, *, kwargs=None, **options):
    """``torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, **options)``: pyllm's ops
    export as their PyTorch references (see the module docstring); returns the ``ONNXProgram``."""
    import torch

    return torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, **options)
