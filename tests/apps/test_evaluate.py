"""ITM re-ranking through the model: the fusion layers and matching heads of a tiny stage-2 model,
the queries split over two data-parallel ranks, against a brute-force re-scoring of every pair."""

from __future__ import annotations

import pytest
import torch

from megavideo.apps.retrieval import UNSCORED
from tests.apps import eval_worker
from tests.distributed import spawn


@pytest.fixture(scope="module")
def reranked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerank")
    spawn(2, eval_worker.rerank_against_brute_force, str(tmp / "run"), str(tmp / "out.pt"))
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("audio", [False, True], ids=["video", "audio_video"])
def test_reranking_every_candidate_equals_the_brute_force_scores(reranked, audio):
    got = reranked[audio]
    v2t, t2v = got["all"]
    assert torch.allclose(v2t, got["pairs"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(t2v, got["pairs"].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("audio", [False, True], ids=["video", "audio_video"])
def test_reranking_the_top_k_scores_them_and_leaves_the_rest(reranked, audio):
    got = reranked[audio]
    v2t, t2v = got["top3"]
    for scores, sim, pairs in ((v2t, got["sim"], got["pairs"]), (t2v, got["sim"].T, got["pairs"].T)):
        chosen = torch.zeros_like(sim, dtype=torch.bool).scatter(1, sim.topk(3).indices, True)
        assert torch.allclose(scores[chosen], pairs[chosen], rtol=1e-5, atol=1e-6)
        assert bool((scores[~chosen] == UNSCORED).all())
