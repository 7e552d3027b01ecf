"""The official evaluation's scores: recall at K, dual softmax, ITM re-ranking, zero-shot top-k."""

from __future__ import annotations

import pytest
import torch

from megavideo.apps.retrieval import (
    UNSCORED,
    classify,
    dual_softmax,
    rerank,
    retrieval_metrics,
    score_sets,
)


def test_a_perfect_and_a_reversed_similarity():
    perfect = retrieval_metrics(torch.eye(20), torch.eye(20), torch.arange(20))
    assert all(value == 100.0 for value in perfect.values())
    # the right pair scores lowest: it ranks last of 20
    worst = retrieval_metrics(-torch.eye(20), -torch.eye(20), torch.arange(20), ks=(1, 19, 20))
    assert worst["t2v_r1"] == worst["t2v_r19"] == 0.0 and worst["t2v_r20"] == 100.0
    assert worst["v2t_r19"] == 0.0 and worst["v2t_r20"] == 100.0


def test_hand_computed_ranks_with_several_captions_per_video():
    """3 videos, 5 texts (video 0 has texts 0, 1; video 1 texts 2, 3; video 2 text 4)."""
    owners = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([[0.1, 0.5, 0.9, 0.0, 0.2],   # video 0: text 2, 1, ... -> best own rank 1
                        [0.3, 0.2, 0.1, 0.8, 0.0],   # video 1: text 3 first -> rank 0
                        [0.9, 0.8, 0.7, 0.6, 0.5]])  # video 2: its text 4 ranks last -> rank 4
    got = retrieval_metrics(sim, sim.T, owners)
    # video -> text ranks 1, 0, 4: R@1 1/3, R@5 3/3
    assert got["v2t_r1"] == pytest.approx(100 / 3) and got["v2t_r5"] == 100.0
    # text -> video: text 0 column [0.1, 0.3, 0.9] -> video 0 ranks 2; text 1 [0.5, 0.2, 0.8] -> 1;
    # text 2 [0.9, 0.1, 0.7] -> 2 ranks 2; text 3 [0.0, 0.8, 0.6] -> 0; text 4 [0.2, 0.0, 0.5] -> 0
    assert got["t2v_r1"] == pytest.approx(100 * 2 / 5)
    assert got["t2v_r5"] == got["t2v_r10"] == 100.0
    assert got["t2v_r_mean"] == pytest.approx((40 + 100 + 100) / 3)
    assert got["r_mean"] == pytest.approx((got["v2t_r_mean"] + got["t2v_r_mean"]) / 2)


def test_dual_softmax_is_the_official_formula():
    sim = torch.randn(4, 6)
    expected = sim * torch.exp(sim) / torch.exp(sim).sum(0, keepdim=True)
    assert torch.allclose(dual_softmax(sim), expected)
    sets = score_sets(sim, None, None, torch.tensor([0, 0, 1, 2, 3, 3]))
    assert set(k.split("/")[0] for k in sets) == {"sim", "dsl"}
    assert sets["dsl/t2v_r1"] == retrieval_metrics(dual_softmax(sim), dual_softmax(sim.T),
                                                   torch.tensor([0, 0, 1, 2, 3, 3]))["t2v_r1"]


def test_rerank_scores_each_rows_top_k_and_splits_rows_over_ranks():
    sim = torch.randn(5, 7)
    pair = torch.randn(5, 7)  # a brute-force score of every pair

    def score(row, cols):
        return pair[row, cols]

    whole = rerank(sim, 7, score, range(5))
    assert torch.equal(whole, pair)  # k = every candidate: the brute-force matrix
    top2 = rerank(sim, 2, score, range(5))
    chosen = torch.zeros_like(sim, dtype=torch.bool).scatter(1, sim.topk(2).indices, True)
    assert torch.equal(top2[chosen], pair[chosen]) and bool((top2[~chosen] == UNSCORED).all())
    halves = rerank(sim, 2, score, range(0, 3)) + rerank(sim, 2, score, range(3, 5))
    assert torch.equal(halves, top2)


def test_zero_shot_top_k_averages_the_prompts():
    video = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    # 3 classes x 2 prompts; class 2's prompts average to the diagonal
    prompts = torch.nn.functional.normalize(torch.tensor([
        [[1.0, 0.0], [1.0, 0.1]], [[0.0, 1.0], [0.1, 1.0]], [[1.0, 0.9], [0.9, 1.0]]]), dim=2)
    got = classify(video, prompts, torch.tensor([0, 2, 2]), ks=(1, 2))
    # clip 1 ([0, 1]) prefers class 1, class 2 second; clips 0 and 2 are right at top-1
    assert got == {"top1": pytest.approx(200 / 3), "top2": 100.0}
