"""Stage 2's objectives: contrastive (VTC), matching with hard negatives (VTM), masked LM (MLM).

All of them run on the last pipeline stage, per micro-batch, with negatives drawn from the whole
data-parallel micro-batch: the contrast all-gathers the projections (gradients summed back to
their owners), and matching fetches only the chosen negatives' tokens from the ranks that hold
them. Every random draw is made on the device from a key of (run seed, step, global sample index,
purpose), so any layout computes the same loss as one process holding the global batch. The
official code's departures from this (``model.official_recipe``) are options of these functions
and of :class:`megavideo.models.stage2.Stage2Model`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.keyed_random import gumbel, uniform
from parallel.comm import all_gather_rows, fetch_rows

TEMPERATURE_RANGE = (0.001, 0.5)  # the official clamp of the learnable temperature


def same_item(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """[b, G]: True where a local sample and a gathered one are the same item (positives)."""
    return idx[:, None] == idx_all[None, :]


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, idx_all: torch.Tensor,
                     temperature: torch.Tensor, dp_group, official: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the gathered micro-batch.

    x, y [b, E] (e.g. video and text projections); samples sharing an ``idx`` are all positives
    (targets spread evenly over them). Averaged over the data-parallel ranks this is the loss of
    the whole micro-batch, and so are its gradients. ``official``: as the official code, every
    rank computes the whole micro-batch's loss from projections gathered without summing their
    gradients back, so after the data-parallel average the gradient is 1/W of the exact one
    (W ranks).
    """
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    x_all = all_gather_rows(x, dp_group, sum_grads=not official)
    y_all = all_gather_rows(y, dp_group, sum_grads=not official)
    if official:
        x, y, idx = x_all, y_all, idx_all
    return info_nce(x @ y_all.T / temperature, y @ x_all.T / temperature, idx, idx_all)


def info_nce(x_to_y: torch.Tensor, y_to_x: torch.Tensor, idx: torch.Tensor,
             idx_all: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE of similarities [b, G] (already / temperature) of this rank's rows
    to the gathered ones, both ways; samples sharing an ``idx`` are all positives."""
    targets = same_item(idx, idx_all).float()
    targets = targets / targets.sum(1, keepdim=True)
    losses = [-(F.log_softmax(sim, dim=1) * targets).sum(1).mean() for sim in (x_to_y, y_to_x)]
    return (losses[0] + losses[1]) / 2


def query_similarities(queries: torch.Tensor, text: torch.Tensor, dp_group,
                       how: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's similarities of a clip's query vectors to a text's vector, the queries' mean or
    max (VideoChat2's ``get_sim``): queries [b, Q, E], text [b, E] (L2-normalised) -> video to
    every gathered text and text to every gathered clip [b, G] (the gathers' gradients summed
    back to their owners)."""
    queries_all, text_all = all_gather_rows(queries, dp_group), all_gather_rows(text, dp_group)
    v2t = torch.einsum("bqe,ge->bqg", queries, text_all)
    t2v = torch.einsum("be,gqe->bqg", text, queries_all)
    pool = (lambda s: s.mean(1)) if how == "mean" else (lambda s: s.max(1).values)
    return pool(v2t), pool(t2v)


def hard_negatives(sim: torch.Tensor, idx: torch.Tensor, idx_all: torch.Tensor,
                   keys: torch.Tensor) -> torch.Tensor:
    """One negative per local row, drawn with probability softmax(sim) over the gathered
    micro-batch, never the same item; [b] global row indices. sim [b, G] (already / temperature),
    keys [b]: the samples' random streams; drawn on the device (Gumbel-max)."""
    logits = sim.detach().double().masked_fill(same_item(idx, idx_all), float("-inf"))
    alone = torch.isinf(logits).all(1, keepdim=True)  # every sample is this item: any other row
    logits = torch.where(alone, torch.zeros_like(logits), logits)
    return (logits + gumbel(keys, (sim.shape[1],))).argmax(1)


def matching_loss(score, text: torch.Tensor, text_mask: torch.Tensor, memory: torch.Tensor,
                  memory_mask: torch.Tensor, video_negatives: torch.Tensor,
                  text_negatives: torch.Tensor, dp_group) -> torch.Tensor:
    """VTM: positives, (text, negative video) and (negative text, video), 1:2, each pair's
    match logits [3b, 2] from ``score(texts, texts_mask, memories, memories_mask)``; their cross
    entropy.

    text [L, b, ...] (states or ids), text_mask [b, L], memory [M, b, W], memory_mask [b, M];
    the negatives are global row indices (:func:`hard_negatives`).
    """
    b = text.shape[1]
    neg_memory = fetch_rows(memory.transpose(0, 1), video_negatives, dp_group).transpose(0, 1)
    neg_memory_mask = fetch_rows(memory_mask, video_negatives, dp_group)
    neg_text = fetch_rows(text.transpose(0, 1), text_negatives, dp_group).transpose(0, 1)
    neg_text_mask = fetch_rows(text_mask, text_negatives, dp_group)
    texts = torch.cat([text, text, neg_text], dim=1)
    texts_mask = torch.cat([text_mask, text_mask, neg_text_mask])
    memories = torch.cat([memory, neg_memory, memory], dim=1)
    memories_mask = torch.cat([memory_mask, neg_memory_mask, memory_mask])
    logits = score(texts, texts_mask, memories, memories_mask)  # [3b, 2]
    labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
    labels[:b] = 1
    return F.cross_entropy(logits.float(), labels)


def mlm_inputs(ids: torch.Tensor, special: dict[str, int], vocab_size: int, probability: float,
               keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of [b, L] token ids: each token but [PAD] and [CLS] is chosen with
    ``probability``; of the chosen, 80% become [MASK], 10% a random token, 10% stay. Returns
    (masked ids, labels with -100 where not chosen); keys [b]: the samples' random streams."""
    draws = uniform(keys, (4, ids.shape[1]))  # [b, 4, L]: choose, mask, random, which token
    chosen = (draws[:, 0] < probability) & (ids != special["pad"]) & (ids != special["cls"])
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    to_mask = chosen & (draws[:, 1] < 0.8)
    to_random = chosen & ~to_mask & (draws[:, 2] < 0.5)
    random_ids = (draws[:, 3] * vocab_size).long()
    masked = torch.where(to_random, random_ids, ids)
    return masked.masked_fill(to_mask, special["mask"]), labels
