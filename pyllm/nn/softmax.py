from __future__ import annotations

import torch

from .. import functional as F
from ..ops._common import check_finite, check_flag


class FusedScaleMaskSoftmax(torch.nn.Module):
    """``softmax(input * scale + mask)`` over the last dim in one fused pass.

    Like Megatron's module of the same name, without its limits: any row length, any
    mask shape broadcastable to the input (bool True = keep, or additive float), fp32
    accumulation, zeros for fully-masked rows. ``causal=True`` adds a top-left causal mask.
    """

    def __init__(self, scale: float = 1.0, causal: bool = False):
        check_finite(scale, "scale")
        check_flag(causal, "causal")
        super().__init__()
        self.scale = float(scale)
        self.causal = bool(causal)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.masked_softmax(input, mask, self.scale, self.causal)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, causal={self.causal}"
