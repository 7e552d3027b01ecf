"""Stage 3's instruction data: a chat template with the video in the prompt, tokenized with a
Hugging Face ``tokenizer.json`` read from a local file, loss on the answer only.

Mistral-Instruct's template, as VideoChat2 uses it for InternVideo2-Chat::

    <s>[INST] <Video>[Q video query tokens]</Video>
    {question} [/INST] {answer}</s>[padding]

The pieces around the video are tokenized separately (VideoChat2 splits the prompt at its video
placeholder the same way). Sequences are right-padded to ``max_length``: with a causal mask no
real token attends to padding, so the causal mask is the whole attention mask. The loss mask
marks the answer's tokens and ``</s>``; targets are the next tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dataloaders.synthetic import COLOURS, PATTERNS, generator

USER, USER_END = "[INST] ", " [/INST]"
VIDEO_START, VIDEO_END = "<Video>", "</Video>\n"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read or lacks <s> or </s> (one sentence)."""


class ChatTokenizer:
    """A ``tokenizers`` tokenizer plus the ids the template needs."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises plain Exceptions for unreadable files
            raise TokenizerError(f"cannot read the tokenizer file {path}: {err}") from None
        self.bos, self.eos = self.tokenizer.token_to_id("<s>"), self.tokenizer.token_to_id("</s>")
        if self.bos is None or self.eos is None:
            raise TokenizerError(f"the tokenizer {path} has no <s> or </s> token.")
        self.pad = self.tokenizer.token_to_id("<pad>")
        self.pad = self.eos if self.pad is None else self.pad

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class Prompt:
    """One tokenized conversation turn: ``ids`` [S] (the video positions hold ``pad``),
    ``video`` [S] True on the video's query positions, ``loss`` [S] True on answer positions
    (predicted from the position before), ``length`` the real tokens."""

    ids: torch.Tensor
    video: torch.Tensor
    loss: torch.Tensor
    length: int


def prompt_ids(tok: ChatTokenizer, question: str, queries: int) -> tuple[list[int], int]:
    """The prompt's ids up to and including ``[/INST]`` and the first video position."""
    head = [tok.bos] + tok.encode(USER + VIDEO_START)
    tail = tok.encode(VIDEO_END + question + USER_END)
    return head + [tok.pad] * queries + tail, len(head)


def conversation(tok: ChatTokenizer, question: str, answer: str | None, queries: int,
                 max_length: int) -> Prompt:
    """The template filled in; ``answer=None`` leaves the prompt open for generation. Answers
    longer than the room left are cut (their ``</s>`` too)."""
    ids, start = prompt_ids(tok, question, queries)
    if len(ids) > max_length - (answer is not None):
        raise ValueError(f"the prompt takes {len(ids)} tokens, more than model.llm.max_length "
                         f"({max_length}) allows with an answer.")
    prompt_len = len(ids)
    if answer is not None:
        ids = (ids + tok.encode(" " + answer) + [tok.eos])[:max_length]
    out = torch.full((max_length,), tok.pad, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids)
    video = torch.zeros(max_length, dtype=torch.bool)
    video[start:start + queries] = True
    loss = torch.zeros(max_length, dtype=torch.bool)
    loss[prompt_len:len(ids)] = True
    return Prompt(out, video, loss, len(ids))


def batch(prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """Stacked ids [B, S] and video positions; ``labels`` [B, S] (the next token) with
    ``loss_mask`` [B, S] (1 where the next token is an answer token)."""
    ids = torch.stack([p.ids for p in prompts])
    loss = torch.stack([p.loss for p in prompts])
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.roll(loss, -1, dims=1)
    loss_mask[:, -1] = False
    return {"ids": ids, "video_mask": torch.stack([p.video for p in prompts]), "labels": labels,
            "loss_mask": loss_mask.float()}


def causal_mask(length: int, device=None) -> torch.Tensor:
    """[1, 1, S, S], True where a query may not attend (megatron-core's convention)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]


# Synthetic instruction data on stage 2's colour clips: three questions per clip.
QUESTIONS = ("what happens in the video ?", "which colour comes first ?",
             "which colour comes last ?")
CHAT_WORDS = ("what", "happens", "in", "the", "video", "?", "which", "colour", "comes", "first",
              "last", "then", *COLOURS)


def synthetic_qa(seed: int, step: int, index: int, pattern: int) -> tuple[str, str]:
    """A question about synthetic clip ``index`` (drawn per step) and its answer."""
    names = list(COLOURS)
    first, second = (names[c] for c in divmod(pattern % PATTERNS, len(names)))
    kind = int(torch.randint(len(QUESTIONS), (1,), generator=generator(seed, step, index, "qa")))
    return QUESTIONS[kind], (f"{first} then {second}", first, second)[kind]


def manifest_qa(row: dict, g: torch.Generator) -> tuple[str, str]:
    """One question-answer pair of a manifest row, drawn uniformly: VideoChat2's instruction
    layout ``"QA": [{"i": instruction, "q": question, "a": answer}, ...]`` (the instruction, when
    given, goes before the question)."""
    pairs = row.get("QA") or row.get("qa") or []
    pair = pairs[int(torch.randint(len(pairs), (1,), generator=g))]
    question = " ".join(p for p in (pair.get("i", ""), pair.get("q", "")) if p)
    return question, pair["a"]


def write_word_tokenizer(words: list[str], path: str | Path) -> None:
    """A word-level tokenizer.json (special tokens <pad>, <unk>, <s>, </s> and the chat template's
    pieces) for synthetic data and tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<Video>", "</Video>"]
    vocab += [w for w in dict.fromkeys(words) if w not in vocab]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.save(str(path))


__all__ = ["CHAT_WORDS", "ChatTokenizer", "Prompt", "QUESTIONS", "TokenizerError", "batch",
           "causal_mask", "conversation", "manifest_qa", "prompt_ids", "synthetic_qa",
           "write_word_tokenizer"]
