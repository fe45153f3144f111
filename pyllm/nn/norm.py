from __future__ import annotations

import torch

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` running :func:`pyllm.functional.layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_add(self, input: torch.Tensor, residual: torch.Tensor):
        """``(self(input + residual), input + residual)`` in one fused pass."""
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` running :func:`pyllm.functional.rms_norm`.

    ``style`` ("torch" by default, or "llama", "t5", "gemma") selects the casting rules of
    the library being replaced; see :func:`pyllm.functional.rms_norm`.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 *, style: str = "torch"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)
        if style not in F.RMS_STYLES:
            raise ValueError(f"pyllm: style must be one of {F.RMS_STYLES}, got {style!r}")
        self.style = style

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, style=self.style)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.style == "torch" else f"{s}, style={self.style!r}"
