"""Stage 3's instruction data: VideoChat2's Mistral template (InternVideo2-Chat), tokenized with
a Hugging Face ``tokenizer.json`` read from a local file, loss on the answers only.

The rendering is the official ``process_qa`` (``video_chat2/dataset/it_dataset_mistral.py``):
the task instruction before the first ``[INST]``, the media alone in the first user turn, then
every question-answer pair of the sample (shuffled by the caller) as its own turn::

    {instruction} [INST] <Video></Video>{msg} [/INST] [INST] {q1} [/INST] {a1} </s>
        [INST] {q2} [/INST] {a2} </s>     (one line, the pairs joined by single spaces)

(``<Image></Image>`` for an image; no media turn for text-only data; ``msg`` the optional
:func:`time_message`). As the official model does, the text is split at the media's end tag, each
side tokenized whole, the query tokens placed between them; a ``<s>`` opens the sequence. The
loss covers each answer and its ``</s>``, found as the official code finds them: the text after
the media split at ``" [/INST] "``, each chunk's answer the part before its next ``"[INST] "``.
Sequences are right-padded to ``max_length`` (cut there): with a causal mask no real token
attends to padding, so the causal mask is the whole attention mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataloaders.manifest import QA_KEYS, usable_qa
from dataloaders.synthetic import COLOURS, PATTERNS, generator

HUMAN, HUMAN_END, ANSWER_END = "[INST]", "[/INST]", "</s>"
VIDEO_HERE = "<VideoHere>"  # where a caption prompt puts the video
MEDIA = {"video": ("<Video>", "</Video>"), "image": ("<Image>", "</Image>"), "text": ("", "")}


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
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` and each one's character span in it."""
        if not text:
            return [], []
        out = self.tokenizer.encode(text, add_special_tokens=False)
        return out.ids, out.offsets

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class QA:
    """One turn of VideoChat2's instruction data: ``{"i": instruction, "q": question, "a":
    answer}`` (an empty question: a caption, the answer alone)."""

    q: str
    a: str
    i: str = ""


def time_message(frames: Sequence[int], fps: float) -> str:
    """VideoChat2's text after the video: when each of its frames was sampled."""
    seconds = ", ".join(str(round(f / fps, 1)) for f in frames)
    return f" The video contains {len(frames)} frames sampled at {seconds} seconds. "


def render(qa: Sequence[QA], media: str = "video", msg: str = "", system: str = "",
           instruction: str | None = None) -> tuple[str, str]:
    """(the conversation, its instruction) as the official ``process_qa`` renders them; the
    instruction is the first pair's unless given."""
    instruction = (qa[0].i if qa else "") if instruction is None else instruction
    text = system + (f"{instruction} " if instruction else "")
    if media != "text":
        start, end = MEDIA[media]
        text += f"{HUMAN} {start}{end}{msg.rstrip()} {HUMAN_END}"
    for turn in qa:
        if turn.q:
            text += f" {HUMAN} {turn.q} {HUMAN_END}"
        text += f" {turn.a} {ANSWER_END}"
    return text.strip(), instruction.strip()


def open_prompt(history: Sequence[QA], question: str, media: str = "video", msg: str = "",
                system: str = "", instruction: str = "") -> str:
    """The conversation so far and a new question, open for the answer."""
    text, _ = render(history, media, msg, system, instruction)
    return f"{text} {HUMAN} {question} {HUMAN_END}".strip()


@dataclass
class Prompt:
    """One tokenized conversation: ``ids`` [S] (the media positions hold ``pad``), ``video``
    [S] True on the query positions, ``loss`` [S] True on answer positions (predicted from the
    position before), ``length`` the real tokens."""

    ids: torch.Tensor
    video: torch.Tensor
    loss: torch.Tensor
    length: int


def _answer_spans(text: str) -> list[tuple[int, int]]:
    """The character spans of the answers (each with its ``</s>``) in ``text``, the text after
    the media, found as the official code finds them: the chunks between ``" [/INST] "``, each
    one's answer the part before its next ``"[INST] "`` (the last chunk all answer)."""
    sep1, sep2 = f"{HUMAN} ", f" {HUMAN_END} "
    chunks = text.split(sep2)
    spans, at = [], len(chunks[0]) + len(sep2)
    for k, chunk in enumerate(chunks[1:], 1):
        answer = chunk if k == len(chunks) - 1 else chunk.split(sep1)[0]
        spans.append((at, at + len(answer.rstrip())))
        at += len(chunk) + len(sep2)
    return [(a, b) for a, b in spans if b > a]


def tokenize(tok: ChatTokenizer, text: str, queries: int, max_length: int, media: str = "video",
             open_ended: bool = False) -> Prompt:
    """A rendered conversation -> ids with ``queries`` media positions after the media's start
    tag (none for ``text``), cut at ``max_length``. Each side of the media is tokenized whole
    (as the official model does) and a token is an answer token where its characters overlap an
    answer's: the official chunk-by-chunk count where that one adds up, and right for tokenizers
    whose pieces do not. ``open_ended``: a prompt for generation, refused when it leaves no room
    for an answer."""
    end = MEDIA[media][1]
    before, after = text.split(end, 1) if end else ("", text)
    after = end + after
    head = [tok.bos] + tok.encode(before)
    tail, offsets = tok.encode_with_offsets(after)
    spans = _answer_spans(after)
    flags = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    ids = head + [tok.pad] * (queries if end else 0) + tail
    if open_ended and len(ids) >= max_length:
        raise ValueError(f"the prompt takes {len(ids)} tokens, more than model.llm.max_length "
                         f"({max_length}) allows with an answer (a longer conversation needs a "
                         f"larger model.llm.max_length).")
    loss = [False] * (len(ids) - len(tail)) + flags
    ids, loss = ids[:max_length], loss[:max_length]
    out = torch.full((max_length,), tok.pad, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids)
    video = torch.zeros(max_length, dtype=torch.bool)
    if end:
        video[len(head):len(head) + queries] = True
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[: len(loss)] = torch.tensor(loss)
    return Prompt(out, video, mask, len(ids))


def read_caption_prompts(path: str | Path) -> list[str]:
    """The caption sub-stage's prompts: one per line, each with ``<VideoHere>`` where the video
    goes (VideoChat2's ``prompts/concise_description.txt``), wrapped in its template
    ``[INST] {} [/INST]``."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise ValueError(f"cannot read the caption prompts {path}: {err.strerror}.") from None
    lines = [line for line in lines if line]
    if not lines or any(VIDEO_HERE not in line for line in lines):
        raise ValueError(f"the caption prompts {path} must be lines that each hold {VIDEO_HERE}.")
    return [f"{HUMAN} {line} {HUMAN_END}" for line in lines]


def tokenize_caption(tok: ChatTokenizer, prompt: str, caption: str, queries: int,
                     max_length: int, caption_tokens: int) -> Prompt:
    """A caption sample as the official captioning stage builds it (``videochat2_pt_mistral``):
    ``<s>``, the prompt's text before ``<VideoHere>``, the ``queries`` video positions, the text
    after, then ``caption</s>`` tokenized on its own and cut at ``caption_tokens``; the loss on
    the caption's tokens."""
    before, after = prompt.split(VIDEO_HERE, 1)
    head = [tok.bos] + tok.encode(before)
    answer = tok.encode(caption + ANSWER_END)[:caption_tokens]
    ids = (head + [tok.pad] * queries + tok.encode(after) + answer)[:max_length]
    loss = ([False] * (len(ids) - len(answer)) + [True] * len(answer))[:len(ids)]
    out = torch.full((max_length,), tok.pad, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids)
    video = torch.zeros(max_length, dtype=torch.bool)
    video[len(head):len(head) + queries] = True
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[: len(loss)] = torch.tensor(loss)
    return Prompt(out, video, mask, len(ids))


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


def synthetic_qa(seed: int, step: int, index: int, pattern: int) -> list[QA]:
    """A question about synthetic clip ``index`` (drawn per step) and its answer."""
    names = list(COLOURS)
    first, second = (names[c] for c in divmod(pattern % PATTERNS, len(names)))
    kind = int(torch.randint(len(QUESTIONS), (1,), generator=generator(seed, step, index, "qa")))
    return [QA(QUESTIONS[kind], (f"{first} then {second}", first, second)[kind])]


def manifest_qa(row: dict, g: torch.Generator) -> list[QA]:
    """Every question-answer pair of a manifest row (VideoChat2's instruction layout ``"QA":
    [{"i": instruction, "q": question, "a": answer}, ...]``), shuffled into one multi-turn
    sample as the official data do."""
    pairs = row.get("QA") or row.get("qa") or []
    order = torch.randperm(len(pairs), generator=g).tolist()
    return [QA(pairs[k].get("q", ""), pairs[k]["a"], pairs[k].get("i", "")) for k in order]


def read_text_rows(path: str | Path) -> list[dict]:
    """Text-only instruction data: a JSON list or JSON Lines of rows, each with its
    question-answer pairs under ``"QA"`` (VideoChat2's layout, no media key needed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        rows = json.loads(text) if str(path).endswith(".json") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON{'' if str(path).endswith('.json') else ' Lines'}: "
                         f"{err}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no rows")
    bad = [k for k, row in enumerate(rows)
           if not isinstance(row, dict) or not any(usable_qa(row.get(key)) for key in QA_KEYS)]
    if bad:
        raise ValueError(f"{len(bad)} of {len(rows)} rows of {path} have no question-answer "
                         f"pairs under {'/'.join(QA_KEYS)} (e.g. row {bad[0]})")
    return rows


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


__all__ = ["CHAT_WORDS", "ChatTokenizer", "MEDIA", "Prompt", "QA", "QUESTIONS", "TokenizerError",
           "VIDEO_HERE", "batch", "causal_mask", "manifest_qa", "open_prompt",
           "read_caption_prompts", "read_text_rows", "render", "synthetic_qa", "time_message", "tokenize",
           "tokenize_caption", "write_word_tokenizer"]
