"""BERT's WordPiece tokenizer (uncased), from a vocab file: the text encoder's input in stage 2.

The official InternVideo2 stage 2 tokenizes captions with ``bert-large-uncased`` (max 40 tokens).
This is Hugging Face ``tokenizers``' BERT pipeline on a local vocab file, nothing fetched from a
hub: its BERT normalizer (drop control characters, spaces around CJK ideographs, lower-case, strip
accents), its BERT pre-tokenizer (split on whitespace and punctuation) and its WordPiece model
(the longest vocabulary pieces from the left, ``##`` before the pieces after the first; a word it
cannot split, or one over 100 characters, is one ``[UNK]``).

``encode_batch`` adds ``[CLS] ... [SEP]`` (or only ``[CLS]``, as the official tokenizer does for a
single sequence: ``model.text.sep=false``), truncates and pads to a fixed length;
:func:`clean_caption` is the official code's caption cleaning (its ``pre_text``), applied first
where ``model.text.clean_captions`` asks for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100

_NORMALIZER = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                         strip_accents=True, lowercase=True)
_PRE_TOKENIZER = pre_tokenizers.BertPreTokenizer()


_DROPPED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(text: str) -> str:
    """The official InternVideo2 caption cleaning: lower-case; ``, . ' ! ? " ( ) * # : ; ~``
    removed; ``-`` and ``/`` to spaces, ``<person>`` to ``person``; runs of spaces to one; the
    ends stripped."""
    text = _DROPPED.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return _SPACES.sub(" ", text).rstrip("\n").strip(" ")


class VocabError(ValueError):
    """A vocab file that cannot be read or lacks a special token (one sentence)."""


def basic_tokens(text: str) -> list[str]:
    """Lower-cased, accent-free words and punctuation marks."""
    return [word for word, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALIZER.normalize_str(text))]


class WordPiece:
    """The tokenizer of a BERT vocab file (one token per line, the line number is its id)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = {token: index for index, token in enumerate(vocab)}
        missing = [token for token in SPECIAL if token not in self.vocab]
        if missing:
            raise VocabError(f"the vocab has no {', '.join(missing)} token(s).")
        self.pad, self.unk, self.cls, self.sep, self.mask = (self.vocab[t] for t in SPECIAL)
        self._tokenizer = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]",
                                                     max_input_chars_per_word=MAX_WORD_CHARS))
        self._tokenizer.normalizer = _NORMALIZER
        self._tokenizer.pre_tokenizer = _PRE_TOKENIZER

    @classmethod
    def from_file(cls, path: str | Path) -> WordPiece:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise VocabError(f"cannot read the vocab file {path}: {err.strerror}.") from None
        return cls([line.strip() for line in lines])

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Token ids without the special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], length: int, sep: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` ids (``[CLS] text`` without ``sep``, as the official InternVideo2
        tokenizer makes a single sequence), truncated and padded to ``length``: ids [B, length]
        (int64) and the attention mask [B, length] (True on real tokens)."""
        ids = torch.full((len(texts), length), self.pad, dtype=torch.long)
        end = [self.sep] if sep else []
        # one text at a time: the library's batch encode starts a thread pool, which a data
        # worker forked after it would have to disable (and warn about)
        for row, text in enumerate(texts):
            tokens = [self.cls, *self.encode(text)[: length - 1 - len(end)], *end]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad


DEC = "[DEC]"  # the QFormer's captioning bos, which VideoChat2 adds to BERT's vocabulary


class QFormerText:
    """The QFormer's text tokenizer: BERT's WordPiece with ``[DEC]`` after its vocabulary
    (VideoChat2's ``init_tokenizer``)."""

    def __init__(self, path: str | Path) -> None:
        self.words = WordPiece.from_file(path)
        self.dec = self.words.vocab.get(DEC, len(self.words))
        self.pad, self.cls = self.words.pad, self.words.cls

    def __len__(self) -> int:
        return max(len(self.words), self.dec + 1)

    def captions(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` right-padded to ``length``: ids and mask [B, length]."""
        return self.words.encode_batch(texts, length)

    def instructions(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` within ``length`` (the text's end kept) and left-padded to the
        longest, as VideoChat2 reads the instruction with the queries (its tokenizer truncates
        and pads on the left)."""
        rows = [[self.cls, *self.words.encode(t)[::-1][: length - 2][::-1], self.words.sep]
                for t in texts]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, longest - len(tokens):] = torch.tensor(tokens)
        return ids, ids != self.pad

