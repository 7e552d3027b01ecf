"""Stage 3's instruction template against VideoChat2's own code (``video_chat2/dataset/
it_dataset_mistral.py`` and the loss masking of ``models/videochat_mistra/
videochat2_it_mistral.py``, OpenGVLab/Ask-Anything), transcribed below as the reference."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dataloaders.conversation import (
    QA,
    ChatTokenizer,
    batch,
    manifest_qa,
    open_prompt,
    read_caption_prompts,
    read_text_rows,
    render,
    time_message,
    tokenize,
    tokenize_caption,
    write_word_tokenizer,
)

EXAMPLE = [QA("What is the man doing?", "He is cooking pasta.", "Watch the video and answer the questions."),
           QA("Where is he?", "In a kitchen.")]
FRAMES, FPS = [15, 51, 96, 129, 171, 210, 246, 282], 30


def official_process_qa(qa: list[dict], msg: str = "", system: str = "", start: str = "<Video>",
                        end: str = "</Video>") -> tuple[str, str]:
    """``ITImgTrainDataset_mistral.process_qa`` (random_shuffle off: the caller shuffles)."""
    cur_instruction = ""
    if "i" in qa[0].keys() and qa[0]["i"] != "":
        cur_instruction = qa[0]["i"] + " "
    conversation = system
    if cur_instruction:
        conversation += cur_instruction
    conversation += "[INST]" + " " + start + end + msg.rstrip() + " " + "[/INST]"
    for sentence in qa:
        q, a = sentence["q"], sentence["a"]
        if q != "":
            conversation += " " + "[INST]" + " " + q + " " + "[/INST]"
        conversation += " " + a + " " + "</s>"
    return conversation.strip(), cur_instruction.strip()


def official_targets(tok: ChatTokenizer, p_after: str) -> list[bool]:
    """``VideoChat2_it_mistral.forward``'s masking of the text after the media: True where the
    token is a target."""
    def text_len(text: str) -> int:
        return len(tok.encode(text))

    ids = tok.encode(p_after)
    targets = [True] * len(ids)
    sep1, sep2 = "[INST] ", " [/INST] "
    raw_text = p_after.split(sep2)
    for idx in range(0, len(raw_text) - 1):
        raw_text[idx] = raw_text[idx] + sep2
    cur_len = text_len(raw_text[0].rstrip())
    targets[:cur_len] = [False] * cur_len
    for text in raw_text[1:-1]:
        total_len = text_len(text.rstrip())
        ans_len = text_len((text.split(sep1)[0]).rstrip())
        targets[cur_len + ans_len:cur_len + total_len] = [False] * (total_len - ans_len)
        cur_len += total_len
    cur_len += text_len(raw_text[-1].rstrip())
    assert cur_len == len(ids)
    return targets


def _dicts(qa: list[QA]) -> list[dict]:
    return [{"i": t.i, "q": t.q, "a": t.a} for t in qa]


def test_the_official_example_renders_exactly():
    text, instruction = render(EXAMPLE, msg=time_message(FRAMES, FPS))
    assert text == (
        "Watch the video and answer the questions. [INST] <Video></Video> The video contains 8 "
        "frames sampled at 0.5, 1.7, 3.2, 4.3, 5.7, 7.0, 8.2, 9.4 seconds. [/INST] [INST] What "
        "is the man doing? [/INST] He is cooking pasta. </s> [INST] Where is he? [/INST] In a "
        "kitchen. </s>")
    assert instruction == "Watch the video and answer the questions."
    caption = "[INST] <Video></Video> [/INST] A man cooks pasta. </s>"
    assert render([QA("", "A man cooks pasta.")]) == (caption, "")


@pytest.mark.parametrize("media, start, end", [("video", "<Video>", "</Video>"),
                                               ("image", "<Image>", "</Image>")])
def test_every_case_renders_as_the_official_code(media, start, end):
    rng = random.Random(0)
    words = ["what", "is", "red", "a", "cat", "then", "blue", "?", "."]
    for _ in range(50):
        qa = [QA(" ".join(rng.choices(words, k=rng.randint(0, 4))),
                 " ".join(rng.choices(words, k=rng.randint(1, 5))), rng.choice(["", "Describe it."]))
              for _ in range(rng.randint(1, 4))]
        msg = rng.choice(["", time_message([0, 12], 25)])
        system = rng.choice(["", "You are kind. "])
        assert render(qa, media, msg, system) == official_process_qa(_dicts(qa), msg, system, start, end)


def test_text_only_data_has_no_media_turn():
    """As ``ITTextTrainDataset_mistral.process_qa`` renders it (its two spaces included)."""
    text, _ = render([QA("What is two and two?", "Four.", "Answer briefly.")], "text")
    assert text == "Answer briefly.  [INST] What is two and two? [/INST] Four. </s>"


def test_the_time_message_is_the_officials():
    sec = [str(round(f / FPS, 1)) for f in FRAMES]  # video_chat2/dataset/base_dataset.py
    assert time_message(FRAMES, FPS) == \
        f" The video contains {len(sec)} frames sampled at {', '.join(sec)} seconds. "


@pytest.fixture
def words(tmp_path) -> ChatTokenizer:
    vocab = ("what is the man doing ? he cooking pasta . where in a kitchen watch video and "
             "answer questions").split()
    write_word_tokenizer(vocab, tmp_path / "tok.json")
    return ChatTokenizer(tmp_path / "tok.json")


def test_the_loss_covers_what_the_official_masking_keeps(words):
    """Answers and their </s> only, token for token the official targets; the video's query
    positions follow the media's start tag."""
    qa = [QA("what is the man doing ?", "he is cooking pasta .", "watch the video"),
          QA("where is he ?", "in a kitchen ."), QA("", "a man cooking pasta .")]
    text, _ = render(qa)
    prompt = tokenize(words, text, queries=3, max_length=64)
    after = "</Video>" + text.split("</Video>")[1]
    tail = words.encode(after)
    start = prompt.length - len(tail)
    assert prompt.loss[start:prompt.length].tolist() == official_targets(words, after)
    assert not prompt.loss[:start].any() and not prompt.loss[prompt.length:].any()
    head = [words.bos] + words.encode(text.split("</Video>")[0])
    assert prompt.ids[:len(head)].tolist() == head and prompt.video[len(head):len(head) + 3].all()
    assert int(prompt.video.sum()) == 3
    b = batch([prompt])
    answers = words.decode(b["labels"][0][b["loss_mask"][0].bool()].tolist())
    assert answers == "he is cooking pasta . in a kitchen . a man cooking pasta ."
    assert (b["labels"][0][b["loss_mask"][0].bool()] == words.eos).sum() == 3


def test_a_subword_tokenizer_marks_exactly_the_answers(tmp_path):
    """A SentencePiece-style BPE (Metaspace, spaces inside pieces), whose pieces tokenized one
    by one do not add up to the whole (the official count would fail its assert): the loss
    tokens are still exactly each answer and its </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    corpus = [t.q for t in EXAMPLE] + [t.a for t in EXAMPLE] + [EXAMPLE[0].i]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]))
    tok.save(str(tmp_path / "bpe.json"))
    bpe = ChatTokenizer(tmp_path / "bpe.json")
    text, _ = render(EXAMPLE)
    prompt = tokenize(bpe, text, queries=4, max_length=96)
    ids = prompt.ids[prompt.loss].tolist()
    pieces = "".join(bpe.tokenizer.id_to_token(i) for i in ids).replace("\u2581", " ")
    assert pieces == " He is cooking pasta. </s> In a kitchen. </s>"
    with pytest.raises(AssertionError):
        official_targets(bpe, "</Video>" + text.split("</Video>")[1])


def test_an_open_prompt_ends_at_the_question(words):
    history = [QA("what is the man doing ?", "he is cooking pasta .")]
    assert open_prompt(history, "where is he ?", instruction="watch the video") == (
        "watch the video [INST] <Video></Video> [/INST] [INST] what is the man doing ? [/INST] he "
        "is cooking pasta . </s> [INST] where is he ? [/INST]")
    prompt = tokenize(words, open_prompt([], "where is he ?"), 3, 32, open_ended=True)
    assert prompt.ids[prompt.length - 1] == words.tokenizer.token_to_id("[/INST]")
    with pytest.raises(ValueError, match="max_length"):
        tokenize(words, open_prompt([], "where is he ?"), 3, prompt.length, open_ended=True)


def test_a_rows_pairs_are_shuffled_into_one_sample():
    row = {"QA": [{"i": "watch", "q": f"q{k}", "a": f"a{k}"} for k in range(5)]}
    got = manifest_qa(row, torch.Generator().manual_seed(3))
    assert sorted(t.q for t in got) == [f"q{k}" for k in range(5)]
    assert [t.q for t in got] != [f"q{k}" for k in range(5)]  # this seed's order differs
    assert got == manifest_qa(row, torch.Generator().manual_seed(3))


def _official_caption(tok: ChatTokenizer, prompt: str, caption: str, queries: int,
                      max_txt_len: int) -> tuple[list[int], list[int]]:
    """``VideoChat2_pt_mistral.prompt_wrap`` and ``forward`` transcribed: <s>, the prompt split
    at <VideoHere> around the queries, then ``caption + end_sym`` tokenized on its own and
    truncated; targets -100 up to the caption. Returns (ids, targets), -1 at the queries."""
    p_before, p_after = prompt.split("<VideoHere>")
    before, after = tok.encode(p_before), tok.encode(p_after)
    text = tok.encode(caption + "</s>")[:max_txt_len]
    ids = [tok.bos] + before + [-1] * queries + after + text
    targets = [-100] * (1 + len(before) + queries + len(after)) + text
    return ids, targets


def test_a_caption_sample_is_the_officials(words, tmp_path):
    """The caption sub-stage's sample: VideoChat2's prompt template around the prompt line,
    the caption after it, the loss on the caption's tokens and its </s> (cut as max_txt_l)."""
    (tmp_path / "prompts.txt").write_text("<Video><VideoHere></Video> watch the video\n\n")
    prompts = read_caption_prompts(tmp_path / "prompts.txt")
    assert prompts == ["[INST] <Video><VideoHere></Video> watch the video [/INST]"]
    for caption, cut in (("a man cooking pasta .", 32), ("a man cooking pasta in a kitchen .", 4)):
        ids, targets = _official_caption(words, prompts[0], caption, 3, cut)
        got = tokenize_caption(words, prompts[0], caption, 3, 64, cut)
        n = got.length
        assert n == len(ids)
        assert [i for i, v in zip(got.ids[:n].tolist(), got.video[:n].tolist(), strict=True)
                if not v] == [i for i in ids if i != -1]
        assert got.video[:n].tolist() == [i == -1 for i in ids]
        assert got.loss[:n].tolist() == [t != -100 for t in targets]


def test_caption_prompts_without_a_video_place_are_refused(tmp_path):
    (tmp_path / "bad.txt").write_text("Describe the video.\n")
    with pytest.raises(ValueError, match="<VideoHere>"):
        read_caption_prompts(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_caption_prompts(tmp_path / "missing.txt")


def test_text_only_rows_are_read_or_refused_in_one_sentence(tmp_path):
    rows = [{"QA": [{"i": "Answer briefly.", "q": "What is two and two?", "a": "Four."}]},
            {"qa": [{"q": "Say hi.", "a": "Hi."}], "source": "chat"}]
    (tmp_path / "text.json").write_text(json.dumps(rows))
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_text_rows(tmp_path / "text.json") == rows == read_text_rows(tmp_path / "text.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"QA": []}))
    with pytest.raises(ValueError, match=r"^1 of 2 rows of .*bad.jsonl have no question-answer "
                       r"pairs under QA/qa \(e.g. row 1\)$"):
        read_text_rows(tmp_path / "bad.jsonl")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="is not JSON"):
        read_text_rows(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="cannot read"):
        read_text_rows(tmp_path / "missing.jsonl")
