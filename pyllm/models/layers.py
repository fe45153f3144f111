"""Transformer building blocks with the course's names, running on pyllm's fused ops.

* attention: :func:`pyllm.functional.scaled_dot_product_attention` (one fused call for
  scores, scale, masks, softmax and the weighted sum; causal masks are never materialized);
* residual + LayerNorm: :meth:`pyllm.nn.LayerNorm.forward_add` (one pass over memory).

Masks everywhere follow SDPA: a **bool** mask is True where attention is allowed, a
**floating** mask is added to the scores (0 = keep, ``-inf`` = hide). A 2-D mask is
``[Lq, Lk]``, 3-D is ``[B, Lq, Lk]``, 4-D is ``[B, H or 1, Lq, Lk]``; size-1 dims broadcast
(a padding mask is typically ``[B, 1, 1, Lk]``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import functional as PF
from ..nn import LayerNorm

__all__ = [
    "PositionalEncoding", "MultiHeadAttention", "FeedForwardSubLayer", "EncoderLayer",
    "DecoderLayer", "ClassifierHead",
]

KV = Tuple[torch.Tensor, torch.Tensor]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"pyllm: {name} must be a positive int, got {value!r}")


def _check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"pyllm: dropout must be a number in [0, 1), got {p!r}")


def _check_heads(d_model, num_heads) -> None:
    _check_positive_int(d_model, "d_model")
    _check_positive_int(num_heads, "num_heads")
    if d_model % num_heads != 0:
        raise ValueError(f"pyllm: d_model ({d_model}) must be divisible by num_heads ({num_heads}); "
                         f"each head gets d_model // num_heads features")


def normalize_mask(mask: Optional[torch.Tensor], name: str = "mask") -> Optional[torch.Tensor]:
    """Bring a user mask to 4-D ``[B|1, H|1, Lq|1, Lk]`` and reject the course's 0/1 float masks.

    A float mask made only of 0s and 1s (``torch.tril(torch.ones(L, L))``) is ambiguous: as an
    additive mask it would hide nothing. Pass ``mask.bool()`` (True = attend) instead.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"pyllm: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() < 2 or mask.dim() > 4:
        raise ValueError(f"pyllm: {name} must be 2-D [Lq, Lk], 3-D [B, Lq, Lk] or 4-D [B, H, Lq, Lk], "
                         f"got shape {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"pyllm: {name} must be bool (True = attend) or a floating additive mask, "
                            f"got {mask.dtype}; use mask.bool() for a 0/1 mask")
        if not torch.compiler.is_compiling() and mask.numel() > 0:
            if bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any()):
                raise ValueError(f"pyllm: {name} is a float mask of 0s and 1s; floating masks are additive "
                                 f"(0 = keep, -inf = hide). Pass {name}.bool() (True = attend) instead")
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    elif mask.dim() == 2:
        mask = mask[None, None]
    return mask


def merge_masks(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Combine two 4-D masks (bool: logical and; float: sum, a hidden bool becoming -inf)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    fdt = a.dtype if a.dtype != torch.bool else b.dtype

    def additive(m):
        if m.dtype != torch.bool:
            return m
        return torch.zeros(m.shape, dtype=fdt, device=m.device).masked_fill(~m, float("-inf"))

    return additive(a) + additive(b)


class PositionalEncoding(nn.Module):
    """Sinusoidal positional encoding (Vaswani et al., 2017), added to the embeddings.

    ``pe[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``pe[pos, 2i+1] = cos(...)``, kept in the
    registered buffer ``pe`` of shape ``[1, max_seq_length, d_model]`` (saved in the state dict,
    moved by ``.to()``, never trained).
    """

    def __init__(self, d_model: int, max_seq_length: int):
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(max_seq_length, "max_seq_length")
        self.d_model, self.max_seq_length = d_model, max_seq_length
        position = torch.arange(max_seq_length, dtype=torch.float64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_seq_length, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe.to(torch.get_default_dtype()).unsqueeze(0))

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
        """``x + pe`` for ``x`` of shape ``[B, L, d_model]``.

        ``positions`` (long ``[L]`` or ``[B, L]``) gives each token's position; otherwise the
        positions are ``offset, offset+1, ...`` (``offset`` = tokens already in a KV cache).
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"pyllm: PositionalEncoding expects x of shape [B, L, {self.d_model}], "
                             f"got {list(x.shape)}")
        length = x.shape[1]
        if positions is None:
            if offset + length > self.max_seq_length:
                raise ValueError(f"pyllm: sequence of length {offset + length} exceeds max_seq_length "
                                 f"{self.max_seq_length} of the positional encoding")
            return x + self.pe[:, offset: offset + length].to(x.dtype)
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.max_seq_length:
            raise ValueError(f"pyllm: position {int(positions.max())} exceeds max_seq_length "
                             f"{self.max_seq_length} of the positional encoding")
        return x + self.pe[0, positions].to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with the course's projections ``W_q``, ``W_k``, ``W_v``, ``W_o``.

    ``forward(query, key, value, mask=None)`` takes ``[B, L, d_model]`` tensors and returns
    ``[B, Lq, d_model]``. The heads are computed by one fused
    :func:`pyllm.functional.scaled_dot_product_attention` call.

    KV cache (generation): pass ``use_cache=True`` to also get the projected ``(k, v)`` heads
    ``[B, H, Lk, d_head]``; feed them back as ``past_kv`` with only the new tokens as
    ``query``/``key``/``value``. The new keys are appended to the cache and a causal mask is
    aligned to the end of the keys (``causal_alignment="bottom_right"``), so a 1-token query
    sees the whole prefix. ``static_kv=True`` (cross-attention) reuses ``past_kv`` as is.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_heads(d_model, num_heads)
        _check_dropout(dropout)
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.dropout = float(dropout)
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, d_model]`` -> ``[B, H, L, d_head]`` (a view)."""
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def combine_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, d_head]`` -> ``[B, L, d_model]``."""
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, self.d_model)

    def _check_input(self, t, name):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pyllm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != self.d_model:
            raise ValueError(f"pyllm: {name} must have shape [B, L, {self.d_model}] (batch_first, d_model="
                             f"{self.d_model}), got {list(t.shape)}")

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
                is_causal: bool = False, past_kv: Optional[KV] = None, use_cache: bool = False,
                static_kv: bool = False):
        key = query if key is None else key
        value = key if value is None else value
        self._check_input(query, "query")
        q = self.split_heads(self.W_q(query))
        if static_kv and past_kv is not None:
            k, v = past_kv
        else:
            self._check_input(key, "key")
            self._check_input(value, "value")
            if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
                raise ValueError(f"pyllm: query {list(query.shape)}, key {list(key.shape)} and value "
                                 f"{list(value.shape)} must share the batch size; key and value the length")
            k = self.split_heads(self.W_k(key))
            v = self.split_heads(self.W_v(value))
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)
                v = torch.cat([past_kv[1], v], dim=2)
        mask = normalize_mask(mask)
        # With a cache the queries are the *last* Lq of Lk positions: align the causal mask
        # to the end of the keys (identical to top-left when Lq == Lk).
        alignment = "bottom_right" if (is_causal and past_kv is not None and not static_kv) else "top_left"
        out = PF.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal, causal_alignment=alignment)
        out = self.W_o(self.combine_heads(out))
        if use_cache:
            return out, (k, v)
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"


class FeedForwardSubLayer(nn.Module):
    """Position-wise feed-forward: ``fc2(dropout(relu(fc1(x))))``, ``d_model -> d_ff -> d_model``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(d_ff, "d_ff")
        _check_dropout(dropout)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward, each wrapped in dropout, residual and LayerNorm.

    Post-norm (default, as the original paper and ``torch.nn.TransformerEncoderLayer``)::

        x = norm1(x + dropout(self_attn(x, x, x, mask)))
        x = norm2(x + dropout(ff_sublayer(x)))

    ``norm_first=True`` gives pre-norm (``x = x + dropout(self_attn(norm1(x)))``, ...). Each
    residual add and the LayerNorm that follows it run as one fused ``add_layer_norm``.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1, *,
                 norm_first: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ff_sublayer = FeedForwardSubLayer(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = bool(norm_first)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                is_causal: bool = False) -> torch.Tensor:
        if self.norm_first:
            h = self.norm1(x)
            a = self.self_attn(h, h, h, mask, is_causal=is_causal)
            h, x = self.norm2.forward_add(self.dropout(a), x)  # x += attn; h = norm2(x), fused
            return x + self.dropout(self.ff_sublayer(h))
        a = self.self_attn(x, x, x, mask, is_causal=is_causal)
        x = self.norm1.forward_add(self.dropout(a), x)[0]
        return self.norm2.forward_add(self.dropout(self.ff_sublayer(x)), x)[0]

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "EncoderLayer":
        """An :class:`EncoderLayer` with the weights of a ``torch.nn.TransformerEncoderLayer``
        (ReLU activation, ``batch_first=True``)."""
        _check_torch_layer(layer)
        sa = layer.self_attn
        new = cls(sa.embed_dim, sa.num_heads, layer.linear1.out_features, layer.dropout.p,
                  norm_first=layer.norm_first, layer_norm_eps=layer.norm1.eps)
        _copy_mha(new.self_attn, sa)
        _copy_ff(new.ff_sublayer, layer)
        new.norm1.load_state_dict(layer.norm1.state_dict())
        new.norm2.load_state_dict(layer.norm2.state_dict())
        return new.to(sa.in_proj_weight.device, sa.in_proj_weight.dtype)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output ``y``, feed-forward.

    ``forward(x, y, causal_mask=None, cross_mask=None)``: with ``causal_mask=None`` the
    self-attention is causal (SDPA's ``is_causal``, no mask tensor is built); a given
    ``causal_mask`` replaces it unless ``is_causal=True`` is also passed (then both apply, e.g.
    a target padding mask on top of causality). ``cross_mask`` masks the encoder positions
    (source padding, ``[B, 1, 1, Ls]``).

    ``cross_attention=False`` drops the cross-attention sub-layer: the block of a decoder-only
    (GPT-style) model.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float = 0.1, *,
                 cross_attention: bool = True, norm_first: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout) if cross_attention else None
        self.ff_sublayer = FeedForwardSubLayer(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps) if cross_attention else None
        self.dropout = nn.Dropout(dropout)
        self.norm_first = bool(norm_first)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                causal_mask: Optional[torch.Tensor] = None, cross_mask: Optional[torch.Tensor] = None, *,
                is_causal: Optional[bool] = None, past_kv=None, use_cache: bool = False):
        """``past_kv``/``use_cache``: the layer's cache is ``(self_kv, cross_kv)`` (``cross_kv`` is
        None without cross-attention); with ``use_cache=True`` returns ``(x, new_cache)``."""
        if is_causal is None:
            is_causal = causal_mask is None
        if self.cross_attn is not None and y is None and (past_kv is None or past_kv[1] is None):
            raise ValueError("pyllm: DecoderLayer with cross-attention needs the encoder output y")
        past_self, past_cross = (None, None) if past_kv is None else past_kv
        norms = [self.norm1] + ([self.norm2] if self.cross_attn is not None else []) + \
                [self.norm3 if self.cross_attn is not None else self.norm2]
        cross_kv = None

        def self_block(h):
            return self.self_attn(h, h, h, causal_mask, is_causal=is_causal, past_kv=past_self, use_cache=True)

        def cross_block(h):
            return self.cross_attn(h, y, y, cross_mask, past_kv=past_cross, use_cache=True, static_kv=True)

        if self.norm_first:
            h = norms[0](x)
            a, self_kv = self_block(h)
            h, x = norms[1].forward_add(self.dropout(a), x)
            if self.cross_attn is not None:
                a, cross_kv = cross_block(h)
                h, x = norms[2].forward_add(self.dropout(a), x)
            x = x + self.dropout(self.ff_sublayer(h))
        else:
            a, self_kv = self_block(x)
            x = norms[0].forward_add(self.dropout(a), x)[0]
            if self.cross_attn is not None:
                a, cross_kv = cross_block(x)
                x = norms[1].forward_add(self.dropout(a), x)[0]
            x = norms[-1].forward_add(self.dropout(self.ff_sublayer(x)), x)[0]
        if use_cache:
            return x, (self_kv, cross_kv)
        return x

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> "DecoderLayer":
        """A :class:`DecoderLayer` with the weights of a ``torch.nn.TransformerDecoderLayer``
        (ReLU activation, ``batch_first=True``)."""
        _check_torch_layer(layer)
        sa = layer.self_attn
        new = cls(sa.embed_dim, sa.num_heads, layer.linear1.out_features, layer.dropout.p,
                  norm_first=layer.norm_first, layer_norm_eps=layer.norm1.eps)
        _copy_mha(new.self_attn, sa)
        _copy_mha(new.cross_attn, layer.multihead_attn)
        _copy_ff(new.ff_sublayer, layer)
        for n in ("norm1", "norm2", "norm3"):
            getattr(new, n).load_state_dict(getattr(layer, n).state_dict())
        return new.to(sa.in_proj_weight.device, sa.in_proj_weight.dtype)


class ClassifierHead(nn.Module):
    """The course's classification head: ``log_softmax(Linear(d_model, num_classes)(x))`` over the
    last dimension.

    ``ClassifierHead(d_model, num_classes)(x)`` returns log-probabilities with ``x``'s leading
    shape, exactly as the course writes it: per token on ``[B, L, d_model]`` -> ``[B, L, C]``,
    or per sequence on an already pooled ``[B, d_model]`` -> ``[B, C]``. Train it with
    ``F.nll_loss`` (the course's ``NLLLoss``; ``F.cross_entropy`` gives the same loss on
    log-probabilities).

    ``pooling`` (opt-in) pools ``[B, L, d_model]`` first and returns ``[B, C]``: ``"first"`` reads
    the first position (a ``[CLS]`` token), ``"mean"`` averages the positions that ``mask`` marks
    as real (bool/0-1 ``[B, L]`` or a ``[B, 1, 1, L]`` padding mask; all positions without one).
    """

    POOLINGS = (None, "first", "mean")

    def __init__(self, d_model: int, num_classes: int, pooling: Optional[str] = None):
        super().__init__()
        _check_positive_int(d_model, "d_model")
        _check_positive_int(num_classes, "num_classes")
        if pooling not in self.POOLINGS:
            raise ValueError(f"pyllm: pooling must be None (per position, the course's head), 'first' or "
                             f"'mean', got {pooling!r}")
        self.d_model, self.num_classes, self.pooling = d_model, num_classes, pooling
        self.fc = nn.Linear(d_model, num_classes)

    def pool(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, L, d_model]`` -> ``[B, d_model]`` by ``self.pooling`` (``"first"`` or ``"mean"``)."""
        if x.dim() != 3:
            raise ValueError(f"pyllm: ClassifierHead(pooling={self.pooling!r}) expects x of shape "
                             f"[B, L, {self.d_model}], got {list(x.shape)}")
        if self.pooling == "first":
            return x[:, 0, :]
        if mask is None:
            return x.mean(dim=1)
        if mask.numel() != x.shape[0] * x.shape[1]:
            raise ValueError(f"pyllm: ClassifierHead mask must have B x L = {x.shape[0]} x {x.shape[1]} entries "
                             f"([B, L] or [B, 1, 1, L], True = real token), got shape {list(mask.shape)}")
        keep = mask.reshape(x.shape[0], x.shape[1]).to(x.dtype)
        return (x * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"pyllm: ClassifierHead expects x of shape [..., {self.d_model}] "
                             f"(e.g. [B, L, d_model] or [B, d_model]), got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.pooling is None:
            if mask is not None:
                raise ValueError("pyllm: ClassifierHead without pooling classifies every position; a mask "
                                 "is only used with pooling='mean'")
        else:
            x = self.pool(x, mask)
        return torch.nn.functional.log_softmax(self.fc(x), dim=-1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_classes={self.num_classes}, pooling={self.pooling!r}"


# --------------------------------------------------------------------------- torch interop
def _check_torch_layer(layer):
    if not getattr(layer, "self_attn", None) or not layer.self_attn.batch_first:
        raise ValueError("pyllm: from_torch needs a torch.nn.Transformer*Layer built with batch_first=True")
    act = getattr(layer, "activation", None)
    if not (act is torch.nn.functional.relu or isinstance(act, nn.ReLU)):
        raise ValueError(f"pyllm: from_torch supports the ReLU activation only, got {act!r}")


def _copy_mha(dst: MultiHeadAttention, src: nn.MultiheadAttention) -> None:
    wq, wk, wv = src.in_proj_weight.detach().chunk(3, dim=0)
    bq, bk, bv = src.in_proj_bias.detach().chunk(3, dim=0)
    with torch.no_grad():
        for lin, w, b in ((dst.W_q, wq, bq), (dst.W_k, wk, bk), (dst.W_v, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        dst.W_o.weight.copy_(src.out_proj.weight)
        dst.W_o.bias.copy_(src.out_proj.bias)


def _copy_ff(dst: FeedForwardSubLayer, layer) -> None:
    dst.fc1.load_state_dict(layer.linear1.state_dict())
    dst.fc2.load_state_dict(layer.linear2.state_dict())
