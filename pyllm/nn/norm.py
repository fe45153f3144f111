from __future__ import annotations

import torch

from .. import functional as F
from ..ops._common import check_eps, check_normalized_shape


def _check_shape(normalized_shape) -> None:
    shape = check_normalized_shape(normalized_shape)
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"pyllm: normalized_shape must be a non-empty sequence of sizes >= 0, got {list(shape)}")


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` running :func:`pyllm.functional.layer_norm`.

    Same constructor; a bad ``normalized_shape`` (a float, a bool, a negative size) or ``eps``
    (not a finite number >= 0) raises at construction."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        _check_shape(normalized_shape)
        check_eps(eps)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

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
        if not isinstance(style, str) or style not in F.RMS_STYLES:
            raise ValueError(f"pyllm: style must be one of {F.RMS_STYLES}, got {style!r}")
        _check_shape(normalized_shape)
        check_eps(eps, allow_none=True)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)
        self.style = style

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, style=self.style)

    def forward_add(self, input: torch.Tensor, residual: torch.Tensor):
        """``(self(input + residual), input + residual)`` in one fused pass."""
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps, style=self.style)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.style == "torch" else f"{s}, style={self.style!r}"
