"""Recall at K of video-text retrieval."""

from __future__ import annotations

import pytest
import torch

from megavideo.apps.retrieval import recall_at_k


def test_a_perfect_and_a_reversed_similarity():
    perfect = recall_at_k(torch.eye(20), torch.arange(20))
    assert all(value == 100.0 for value in perfect.values())
    # the right pair scores lowest: it ranks last of 20
    worst = recall_at_k(-torch.eye(20), torch.arange(20), ks=(1, 19, 20))
    assert worst["t2v/R@1"] == worst["t2v/R@19"] == 0.0 and worst["t2v/R@20"] == 100.0
    assert worst["v2t/R@19"] == 0.0 and worst["v2t/R@20"] == 100.0


def test_a_video_with_several_captions_counts_its_best_one():
    # texts 0, 1 describe video 0, text 2 video 1
    sim = torch.tensor([[0.1, 0.9],    # text 0 prefers the wrong video
                        [0.8, 0.2],    # text 1 finds video 0
                        [0.3, 0.4]])   # text 2 finds video 1
    scores = recall_at_k(sim, torch.tensor([0, 0, 1]), ks=(1,))
    assert scores["t2v/R@1"] == pytest.approx(200 / 3)
    # video 0's best text (text 1, 0.8) ranks first; video 1's text 2 (0.4) ranks after text 0 (0.9)
    assert scores["v2t/R@1"] == 50.0
    assert scores["mean_R"] == pytest.approx((200 / 3 + 50) / 2)


def test_videos_without_texts_are_refused():
    with pytest.raises(ValueError, match="every video needs at least one text"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="every video needs at least one text"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 2]))
