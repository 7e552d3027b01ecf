"""BERT's WordPiece tokenizer (uncased), from a vocab file: the text encoder's input in stage 2.

The official InternVideo2 stage 2 tokenizes captions with ``bert-large-uncased`` (max 40 tokens).
This is the same algorithm, written from BERT's description, with nothing fetched from a hub:

1. basic tokenization: drop control characters, put spaces around CJK ideographs, split on
   whitespace, lower-case and strip accents (NFD, combining marks removed), split punctuation off;
2. WordPiece: each word is split greedily into the longest vocabulary entries from the left, the
   pieces after the first spelled ``##piece``; a word that cannot be split (or is longer than 100
   characters) becomes ``[UNK]``.

``encode_batch`` adds ``[CLS] ... [SEP]``, truncates and pads to a fixed length.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import torch

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100


class VocabError(ValueError):
    """A vocab file that cannot be read or lacks a special token (one sentence)."""


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    # ASCII non-letters/digits count as punctuation ("$", "^", "`"), as in BERT
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F
            or 0x2B820 <= code <= 0x2CEAF or 0xF900 <= code <= 0xFAFF
            or 0x2F800 <= code <= 0x2FA1F)


def _clean(text: str) -> str:
    out = []
    for char in text:
        code = ord(char)
        if code in (0, 0xFFFD):
            continue
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            out.append(" ")
        elif unicodedata.category(char).startswith("C"):
            continue
        elif _is_cjk(code):
            out.append(f" {char} ")
        else:
            out.append(char)
    return "".join(out)


def _split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current = ""
    for char in word:
        if _is_punctuation(char):
            if current:
                pieces.append(current)
            pieces.append(char)
            current = ""
        else:
            current += char
    return [*pieces, current] if current else pieces


def basic_tokens(text: str) -> list[str]:
    """Lower-cased, accent-free words and punctuation marks."""
    words = []
    for word in _clean(text).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                       if unicodedata.category(c) != "Mn")
        words.extend(_split_punctuation(word))
    return words


class WordPiece:
    """The tokenizer of a BERT vocab file (one token per line, the line number is its id)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = {token: index for index, token in enumerate(vocab)}
        missing = [token for token in SPECIAL if token not in self.vocab]
        if missing:
            raise VocabError(f"the vocab has no {', '.join(missing)} token(s).")
        self.pad, self.unk, self.cls, self.sep, self.mask = (self.vocab[t] for t in SPECIAL)

    @classmethod
    def from_file(cls, path: str | Path) -> WordPiece:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise VocabError(f"cannot read the vocab file {path}: {err.strerror}.") from None
        return cls([line.strip() for line in lines])

    def __len__(self) -> int:
        return len(self.vocab)

    def _pieces(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [piece for word in basic_tokens(text) for piece in self._pieces(word)]

    def encode(self, text: str) -> list[int]:
        """Token ids without the special tokens."""
        return [self.vocab[piece] for piece in self.tokenize(text)]

    def encode_batch(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` ids, truncated and padded to ``length``: ids [B, length] (int64)
        and the attention mask [B, length] (True on real tokens)."""
        ids = torch.full((len(texts), length), self.pad, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.cls, *self.encode(text)[: length - 2], self.sep]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad
