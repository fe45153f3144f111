from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as TF

from .. import functional as F
from ..ops._common import check_finite, check_int, check_same_device, check_tensor


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` running pyllm's fused attention.

    Same constructor, parameters, ``state_dict`` keys and ``forward`` signature/outputs.
    Masks follow torch's MHA convention: a bool ``attn_mask``/``key_padding_mask`` marks
    positions that are NOT allowed (True = ignore); float masks are added to the scores.
    With ``need_weights=True`` the weights come from pyllm's fused ``masked_softmax``.

    Differences: a query whose keys are all masked gets zeros (torch gives NaN).
    ``add_bias_kv`` / ``add_zero_attn`` and the missing-``attn_mask`` error for
    ``is_causal=True`` are handled by the parent implementation.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        embed_dim = check_int(embed_dim, "embed_dim", minimum=1)
        num_heads = check_int(num_heads, "num_heads", minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"pyllm: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        for d, name in ((kdim, "kdim"), (vdim, "vdim")):
            if d is not None:
                check_int(d, name, minimum=1)
        check_finite(dropout, "dropout", minimum=0.0)
        if dropout > 1.0:
            raise ValueError(f"pyllm: dropout must be in [0, 1], got {dropout}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> None:
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            check_tensor(t, name)
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"pyllm: MultiheadAttention expects query/key/value of rank 2 (unbatched) "
                             f"or 3, got {list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
        for t, name in ((key, "key"), (value, "value")):
            check_same_device(t, name, query, "query")
        # [L, N, E] / [N, L, E] (batch_first) / [L, E]: the batch and length dims to compare
        bdim = (0 if self.batch_first else 1) if query.dim() == 3 else None
        ldim = (1 if self.batch_first else 0) if query.dim() == 3 else 0
        if bdim is not None and not (query.shape[bdim] == key.shape[bdim] == value.shape[bdim]):
            raise ValueError(f"pyllm: query, key and value must have the same batch size, got shapes "
                             f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
                             f"{' (batch_first=True)' if self.batch_first else ''}")
        if key.shape[ldim] != value.shape[ldim]:
            raise ValueError(f"pyllm: key and value must have the same length, got shapes {list(key.shape)} "
                             f"and {list(value.shape)}")
        for t, name, want in ((query, "query", self.embed_dim), (key, "key", self.kdim),
                              (value, "value", self.vdim)):
            if t.shape[-1] != want:
                raise ValueError(f"pyllm: {name}'s last dim must be {want} "
                                 f"({'embed_dim' if name == 'query' else ('kdim' if name == 'key' else 'vdim')}), "
                                 f"got shape {list(t.shape)}")
        for m, name in ((attn_mask, "attn_mask"), (key_padding_mask, "key_padding_mask")):
            if m is None:
                continue
            check_tensor(m, name)
            if m.dtype != torch.bool and not m.is_floating_point():
                raise TypeError(f"pyllm: {name} must be bool (True = not allowed to attend) or a floating "
                                f"additive mask, got {m.dtype}")
            check_same_device(m, name, query, "query")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if self.bias_k is not None or self.add_zero_attn or (is_causal and attn_mask is None):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now [L, N, E]
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"pyllm: query's embedding dim {embed_dim} must equal embed_dim {self.embed_dim}")
        H, hd = self.num_heads, self.head_dim
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q = TF.linear(query, wq, bq)
        k = TF.linear(key, wk, bk)
        v = TF.linear(value, wv, bv)
        # [L, N, E] -> [N, H, L, hd]
        q = q.view(tgt_len, bsz, H, hd).permute(1, 2, 0, 3)
        k = k.view(src_len, bsz, H, hd).permute(1, 2, 0, 3)
        v = v.view(src_len, bsz, H, hd).permute(1, 2, 0, 3)
        mask = self._merge_masks(attn_mask, key_padding_mask, bsz, tgt_len, src_len, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1)
            weights = F.masked_softmax(scores, mask, scale=1.0 / math.sqrt(hd))
            p = TF.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
            attn = p @ v
            weights = p
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        attn = attn.permute(2, 0, 1, 3).reshape(tgt_len, bsz, E)
        out = TF.linear(attn, self.out_proj.weight, self.out_proj.bias)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _merge_masks(self, attn_mask, key_padding_mask, bsz, tgt_len, src_len, dtype):
        """One mask for pyllm: bool True = keep, or additive float; [N, H|1, L, S] or [L, S]."""
        am = kpm = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise ValueError(f"pyllm: 2-D attn_mask must have shape {[tgt_len, src_len]}, "
                                     f"got {list(attn_mask.shape)}")
                am = attn_mask
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * self.num_heads, tgt_len, src_len):
                    raise ValueError(f"pyllm: 3-D attn_mask must have shape "
                                     f"{[bsz * self.num_heads, tgt_len, src_len]}, got {list(attn_mask.shape)}")
                am = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"pyllm: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(f"pyllm: key_padding_mask must have shape {[bsz, src_len]}, "
                                 f"got {list(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            for m in masks[1:]:
                keep = keep & ~m
            return keep
        total = None
        for m in masks:
            f = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
                 if m.dtype == torch.bool else m.to(dtype))
            total = f if total is None else total + f
        return total
