"""The demo's data: the shipped text (``pyllm/data/verses.txt``), a character tokenizer and a
deterministic labelled classification task."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Tuple

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_text(name: str = "verses.txt") -> str:
    """The shipped public-domain text (see pyllm/data/README.md)."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"pyllm: data file {path} is missing (is pyllm installed with its package data?)")
    return path.read_text(encoding="ascii")


class CharTokenizer:
    """Character-level tokenizer: one id per distinct character of the training text."""

    def __init__(self, text: str):
        self.chars: List[str] = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> List[int]:
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"pyllm: character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


# Vocabulary of the classification task: 0 = padding, 1 = [CLS], then letters.
ORDER_PAD, ORDER_CLS = 0, 1
ORDER_LETTERS = "abcdefghijkl"
ORDER_VOCAB = ["<pad>", "<cls>"] + list(ORDER_LETTERS)


def order_task(n: int, seed: int = 0, min_len: int = 6, max_len: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` labelled sequences ``(ids [n, 1 + max_len], labels [n])``, the same for the same seed.

    Each sequence is ``[CLS]`` followed by ``min_len..max_len`` letters, right-padded with 0.
    Exactly one ``a`` and one ``b`` occur, at random places; the label is 1 when the ``a``
    comes before the ``b``. Bag-of-words cannot solve it (both classes have the same letters):
    the model needs attention *and* positions. Classes are balanced by construction.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = 2 + ORDER_LETTERS.index("a"), 2 + ORDER_LETTERS.index("b")
    others = torch.arange(2 + 2, 2 + len(ORDER_LETTERS))
    ids = torch.zeros(n, 1 + max_len, dtype=torch.long)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        seq = others[torch.randint(len(others), (length,), generator=g)]
        pa, pb = torch.randperm(length, generator=g)[:2].tolist()
        label = i % 2
        if (pa < pb) != bool(label):
            pa, pb = pb, pa
        seq[pa], seq[pb] = a, b
        ids[i, 0] = ORDER_CLS
        ids[i, 1: 1 + length] = seq
        labels[i] = label
    perm = torch.randperm(n, generator=g)
    return ids[perm], labels[perm]
