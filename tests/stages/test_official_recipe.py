"""model.official_recipe: the official code's training where it departs from the exact math."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import spawn
from tests.stages import recipe_worker


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    out = tmp_path_factory.mktemp("vtc") / "grads.pt"
    spawn(4, recipe_worker.vtc_gradients, str(out))
    return torch.load(out)


@pytest.fixture(scope="module")
def single_process():
    features, weight, items = recipe_worker.inputs()
    from megavideo.models.objectives import contrastive_loss

    w = weight.clone().requires_grad_()
    x, y = features[0] @ w.T, features[1] @ w.T.flip(0)
    contrastive_loss(x, y, items, items, torch.tensor(0.1), None).backward()
    return w.grad


@pytest.mark.parametrize("world", [2, 4])
def test_the_exact_contrast_gives_the_single_process_gradient(gradients, single_process, world):
    assert torch.allclose(gradients[world][False], single_process, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("world", [2, 4])
def test_the_official_contrast_gives_one_over_w_of_it(gradients, single_process, world):
    """The official all-gather keeps each rank's own rows' gradient of the whole micro-batch's
    loss, which every rank computes; DDP's average then divides by W."""
    official = gradients[world][True]
    assert torch.allclose(official * world, single_process, rtol=1e-5, atol=1e-7)
    ratio = (official.norm() / single_process.norm()).item()
    assert ratio == pytest.approx(1 / world, rel=1e-5)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("how", ["mean", "max"])
def test_the_query_contrast_gives_the_single_process_gradient(gradients, world, how):
    """The align sub-stage's VTC (similarity: the queries' mean or max) over data-parallel
    ranks: the gradient of one process holding the micro-batch."""
    clips, texts, weight, items = recipe_worker.query_inputs()
    single = recipe_worker.query_contrast_gradient(clips, texts, weight, items, slice(None),
                                                   None, how)
    assert torch.allclose(gradients[world][how], single, rtol=1e-5, atol=1e-7)


def test_the_query_similarity_is_videochat2s():
    """VideoChat2's get_sim written out: every clip's queries against every caption, the mean
    (or max) over the queries; InfoNCE both ways against the diagonal."""
    import torch.nn.functional as F

    from megavideo.models.objectives import info_nce, query_similarities

    clips, texts, _, _ = recipe_worker.query_inputs()
    v, t = F.normalize(clips, dim=-1), F.normalize(texts, dim=-1)
    items = torch.arange(len(t))
    for how in ("mean", "max"):
        v2t = torch.stack([torch.stack([(v[i] @ t[j]).mean() if how == "mean" else
                                        (v[i] @ t[j]).max() for j in range(len(t))])
                           for i in range(len(v))])
        expected = (F.cross_entropy(v2t / 0.1, items) + F.cross_entropy(v2t.T / 0.1, items)) / 2
        got = info_nce(*(s / 0.1 for s in query_similarities(v, t, None, how)), items, items)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_stage2_step_with_the_official_recipe(tmp_path):
    """tp 2 x dp 2: BERT's dropout on, per-term MLM masks, local hard negatives; the temperature
    starts above 0.5 and is clamped in place to it."""
    out = tmp_path / "step.pt"
    spawn(4, recipe_worker.official_step, str(tmp_path / "run"), str(out))
    got = torch.load(out)
    assert got["dropout"] == 0.1
    assert {f"loss/{t}" for t in ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")} <= set(got["losses"][0])
    assert all(math.isfinite(v) for step in got["losses"] for v in step.values())
    assert got["temperature"] <= 0.5 + 1e-6
