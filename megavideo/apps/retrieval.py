"""Retrieval and zero-shot classification scores, as the official InternVideo2 evaluation reports
them (``tasks/retrieval_utils.py``, ``tasks_clip/retrieval_utils.py``).

Three score sets of a [videos, texts] cosine similarity ``sim`` between normalised contrastive
embeddings:

    sim     the similarity itself (video -> text: its rows; text -> video: its columns)
    dsl     dual softmax: sim * softmax(sim) over the other side (the videos for each text when
            ranking texts, and the other way round), no temperature
    match   ITM re-ranking: for each query its top ``k`` candidates by similarity re-scored by the
            matching head's class-1 logit on the fusion layers' [CLS]; -100 elsewhere

A text belongs to one video; a video may have several texts (its captions). Video -> text ranks
a video's texts and takes the best; text -> video ranks the text's video. Recall at 1/5/10 is in
percent; ``*_r_mean`` is a direction's mean and ``r_mean`` the mean of the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

UNSCORED = -100.0  # the official fill of the pairs re-ranking leaves out
KS = (1, 5, 10)


def dual_softmax(scores: torch.Tensor) -> torch.Tensor:
    """[queries, candidates] -> scores x softmax over the queries (dim 0), the official DSL."""
    scores = scores.float()
    return scores * scores.softmax(dim=0)


def _ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """[Q] 0-based rank of each query's best relevant candidate; relevant [Q, C] bool."""
    order = scores.argsort(dim=1, descending=True)
    return relevant.gather(1, order).float().argmax(dim=1)


def retrieval_metrics(v2t: torch.Tensor, t2v: torch.Tensor, text_to_video: torch.Tensor,
                      ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall at ``ks`` of video -> text scores [V, T] and text -> video scores [T, V];
    ``text_to_video`` [T] is the video of each text."""
    videos, texts = v2t.shape
    if t2v.shape != (texts, videos) or text_to_video.shape != (texts,):
        raise ValueError(f"scores {tuple(v2t.shape)} and {tuple(t2v.shape)} do not match "
                         f"{texts} texts of {videos} videos.")
    counts = torch.bincount(text_to_video, minlength=videos)
    if counts.numel() > videos or bool((counts == 0).any()):
        raise ValueError("every video needs at least one text and every text a video in range.")
    owns = text_to_video[None, :] == torch.arange(videos)[:, None]  # [V, T]
    out = {}
    for name, rank in (("v2t", _ranks(v2t, owns)), ("t2v", _ranks(t2v, owns.T))):
        recalls = {f"{name}_r{k}": 100.0 * float((rank < k).float().mean()) for k in ks}
        out |= recalls | {f"{name}_r_mean": sum(recalls.values()) / len(recalls)}
    out["r_mean"] = (out["v2t_r_mean"] + out["t2v_r_mean"]) / 2
    return out


def rerank(sim: torch.Tensor, k: int, score: Callable[[int, torch.Tensor], torch.Tensor],
           rows: range) -> torch.Tensor:
    """ITM re-ranking of ``rows`` of [queries, candidates] ``sim``: each row's top ``k``
    candidates get ``score(row, candidates)`` ([k] logits), the rest of the row UNSCORED; rows
    outside ``rows`` are 0, so that summing the matrices of ranks that split the rows gives the
    whole one."""
    out = torch.zeros(sim.shape, dtype=torch.float32)
    k = min(k, sim.shape[1])
    for row in rows:
        top = sim[row].topk(k).indices
        out[row] = UNSCORED
        out[row, top] = score(row, top).float().cpu()
    return out


def score_sets(sim: torch.Tensor, match_v2t: torch.Tensor | None, match_t2v: torch.Tensor | None,
               text_to_video: torch.Tensor) -> dict[str, float]:
    """The three sets' metrics as ``<set>/<metric>`` (``match`` where re-ranking ran)."""
    sets = {"sim": (sim, sim.T), "dsl": (dual_softmax(sim), dual_softmax(sim.T))}
    if match_v2t is not None:
        sets["match"] = (match_v2t, match_t2v)
    return {f"{name}/{key}": value for name, (v2t, t2v) in sets.items()
            for key, value in retrieval_metrics(v2t, t2v, text_to_video).items()}


# the official zero-shot action prompts (dataset/text_prompt.py, kinetics_templates_action_clip)
ACTION_TEMPLATES = (
    "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
    "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
    "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
    "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
    "The man is {}", "The woman is {}",
)


def classify(video: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor,
             ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Zero-shot top-k accuracy (percent): video [V, E] and prompts [classes, P, E] normalised
    embeddings; a class scores the mean cosine similarity over its P prompts, as the official
    zero-shot evaluation averages them; labels [V] the true classes."""
    scores = (video.float() @ prompts.float().flatten(0, 1).T).unflatten(1, prompts.shape[:2])
    top = scores.mean(dim=2).topk(max(ks), dim=1).indices  # [V, max k]
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


__all__ = ["ACTION_TEMPLATES", "UNSCORED", "classify", "dual_softmax", "rerank",
           "retrieval_metrics", "score_sets"]
