"""The WordPiece tokenizer on a vocab built here (BERT's own examples where they exist)."""

from __future__ import annotations

import pytest
import torch

from dataloaders.tokenizer import SPECIAL, VocabError, WordPiece, basic_tokens

WORDS = ["un", "##aff", "##able", "the", "red", "square", "moves", "left", "a", "cafe", ",", ".",
         "!", "$", "5", "##0", "run", "##ning", "\u4e2d", "\u6587", "'", "s", "dog"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join([*SPECIAL, *WORDS]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab_file) -> WordPiece:
    return WordPiece.from_file(vocab_file)


def test_basic_tokenization_lowercases_strips_accents_and_splits_punctuation():
    assert basic_tokens(" \tHeLLo!how  \n Are yoU?  ") == ["hello", "!", "how", "are", "you", "?"]
    assert basic_tokens("H\u00e9llo Caf\u00e9") == ["hello", "cafe"]
    assert basic_tokens("a\u4e2d\u6587b") == ["a", "\u4e2d", "\u6587", "b"]
    assert basic_tokens("it's $50\x00\ufffd") == ["it", "'", "s", "$", "50"]


def test_wordpiece_takes_the_longest_pieces_from_the_left(tokenizer):
    assert tokenizer.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tokenizer.tokenize("The red square, running!") == [
        "the", "red", "square", ",", "run", "##ning", "!"]
    assert tokenizer.tokenize("$50 \u4e2d\u6587") == ["$", "5", "##0", "\u4e2d", "\u6587"]
    # a word with a piece missing from the vocab is one [UNK], not a partial split
    assert tokenizer.tokenize("unaffably dogs") == ["[UNK]", "[UNK]"]
    assert tokenizer.tokenize("a" * 101) == ["[UNK]"]


def test_encode_batch_adds_cls_sep_truncates_and_pads(tokenizer):
    ids, mask = tokenizer.encode_batch(["the red square moves left", "a dog"], length=5)
    v = tokenizer.vocab
    assert ids.tolist() == [[v["[CLS]"], v["the"], v["red"], v["square"], v["[SEP]"]],
                            [v["[CLS]"], v["a"], v["dog"], v["[SEP]"], v["[PAD]"]]]
    assert mask.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert ids.dtype == torch.long and (tokenizer.pad, tokenizer.mask) == (0, 4)


def test_encode_batch_without_sep_keeps_one_more_piece(tokenizer):
    """The official tokenizer: [CLS] and up to length - 1 pieces, no [SEP]."""
    ids, mask = tokenizer.encode_batch(["the red square moves left", "a dog"], length=5, sep=False)
    v = tokenizer.vocab
    assert ids.tolist() == [[v["[CLS]"], v["the"], v["red"], v["square"], v["moves"]],
                            [v["[CLS]"], v["a"], v["dog"], v["[PAD]"], v["[PAD]"]]]
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


def test_a_vocab_without_its_special_tokens_or_file_is_one_sentence(tmp_path):
    with pytest.raises(VocabError, match=r"^the vocab has no \[MASK\] token\(s\)\.$"):
        WordPiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the"])
    with pytest.raises(VocabError, match="cannot read the vocab file .*missing.txt: No such file"):
        WordPiece.from_file(tmp_path / "missing.txt")


def test_the_library_gives_the_pieces_and_ids_of_the_hand_written_wordpiece_it_replaced(tokenizer):
    # pinned from the hand-written WordPiece this module had before it used `tokenizers` (the two
    # agreed on 3,000 random strings of letters, accents, CJK, punctuation and control characters)
    text = "Un-affable DOGS\u00a0run\u2019s caf\u00e9 \u4e2d\u6587!\x00 $50, the red squares."
    assert tokenizer.tokenize(text) == [
        "un", "[UNK]", "[UNK]", "[UNK]", "run", "[UNK]", "s", "cafe", "\u4e2d", "\u6587", "!", "$",
        "5", "##0", ",", "the", "red", "[UNK]", "."]
    assert tokenizer.encode(text) == [5, 1, 1, 1, 21, 1, 26, 14, 23, 24, 17, 18, 19, 20, 15, 8, 9, 1,
                                      16]


def test_captions_are_cleaned_as_the_official_pre_text_cleans_them():
    from dataloaders.tokenizer import clean_caption

    assert clean_caption("A man's <person> jumps -- over the Wall/Fence!  (slowly), \"twice\";~") \
        == "a mans person jumps over the wall fence slowly twice"
    assert clean_caption("  Hello:  World?  \n") == "hello world"
    assert clean_caption("x-ray") == "x ray" and clean_caption("50% #1") == "50% 1"
