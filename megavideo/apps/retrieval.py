"""Zero-shot video-text retrieval scores: recall at K in both directions from a similarity matrix.

A text has one video; a video may have several texts (its captions). Text-to-video ranks the
text's video among all videos; video-to-text takes the best rank of any of the video's texts, as
the standard MSR-VTT/DiDeMo/ActivityNet protocols do.
"""

from __future__ import annotations

import torch


def recall_at_k(sim: torch.Tensor, text_to_video: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``sim`` [texts, videos], ``text_to_video`` [texts] (the video index of each text) ->
    ``t2v/R@k``, ``v2t/R@k`` in percent, and ``mean_R`` (their mean over both directions)."""
    texts, videos = sim.shape
    if text_to_video.shape != (texts,):
        raise ValueError(f"text_to_video has shape {tuple(text_to_video.shape)}, not ({texts},).")
    counts = torch.bincount(text_to_video, minlength=videos)
    if counts.numel() > videos or bool((counts == 0).any()):
        raise ValueError("every video needs at least one text and every text a video in range.")
    by_video = sim.argsort(dim=1, descending=True)  # [T, V]
    t2v_rank = (by_video == text_to_video[:, None]).float().argmax(dim=1)
    by_text = sim.T.argsort(dim=1, descending=True)  # [V, T]
    hits = text_to_video[by_text] == torch.arange(videos)[:, None]
    v2t_rank = hits.float().argmax(dim=1)  # the first of the video's texts
    out = {}
    for name, rank in (("t2v", t2v_rank), ("v2t", v2t_rank)):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * float((rank < k).float().mean())
    out["mean_R"] = sum(out.values()) / len(out)
    return out
