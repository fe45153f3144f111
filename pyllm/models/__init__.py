"""Transformer models built on pyllm's fused ops, with the names of the course they come from.

Layers: :class:`PositionalEncoding`, :class:`MultiHeadAttention`, :class:`FeedForwardSubLayer`,
:class:`EncoderLayer`, :class:`DecoderLayer`, :class:`ClassifierHead`.
Models: :class:`TransformerEncoder`, :class:`TransformerDecoder`, :class:`DecoderOnlyTransformer`,
:class:`Transformer` (encoder-decoder). See docs/TUTORIAL.md.
"""
from .layers import (ClassifierHead, DecoderLayer, EncoderLayer, FeedForwardSubLayer, MultiHeadAttention,
                     PositionalEncoding)
from .transformer import (DecoderOnlyTransformer, Transformer, TransformerDecoder, TransformerEncoder,
                          next_token)
from .datasets import CharTokenizer, load_text, order_task

__all__ = [
    "PositionalEncoding", "MultiHeadAttention", "FeedForwardSubLayer", "EncoderLayer", "DecoderLayer",
    "ClassifierHead", "TransformerEncoder", "TransformerDecoder", "DecoderOnlyTransformer", "Transformer",
    "next_token", "CharTokenizer", "load_text", "order_task",
]
