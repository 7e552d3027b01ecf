"""Chat with megatron-core's static KV cache against the whole sequence run for every token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavideo.apps.chat import Sampling, pick
from tests.apps import chat_worker
from tests.distributed import spawn

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "stage3_tiny.yaml")


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "answers.pt"
    spawn(2, chat_worker.answers, CONFIG, str(out))
    return torch.load(out)


@pytest.mark.parametrize("layout", sorted(chat_worker.LAYOUTS))
@pytest.mark.parametrize("mode", ["greedy", "top_p"])
def test_the_cache_gives_the_tokens_of_the_whole_sequence(answers, layout, mode):
    """Two turns of one conversation (the video encoded once): the same answers, token for
    token, with the cache and without, greedy and top-p sampled, at tp 1, at tp 2 with two
    encoder replicas (also with the QFormer reading the instruction) and at pp 2; the stream
    shows exactly the answer."""
    cached, whole = answers[layout, mode, True], answers[layout, mode, False]
    assert cached == whole
    for text, streamed, tokens in cached:
        assert streamed == text and tokens > 0


def test_the_layouts_answer_alike(answers):
    """Fresh seeded weights are the same at every layout, so are the greedy answers."""
    reference = answers["tp1", "greedy", True]
    for layout in chat_worker.LAYOUTS:
        if "instruction" not in layout:  # another model: the QFormer reads text too
            assert answers[layout, "greedy", True] == reference, layout


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0]).log_softmax(0)
    probs = logits.softmax(0)  # 0.665, 0.245, 0.090, 0.0002
    seen = {int(pick(logits, Sampling(1.0, 0.8), torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1} and probs[0] < 0.8 <= probs[:2].sum()
    assert int(pick(logits, Sampling(), None)) == 0
    assert {int(pick(logits, Sampling(1.0, 1e-3), torch.Generator().manual_seed(s)))
            for s in range(20)} == {0}
