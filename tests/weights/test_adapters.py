"""The weight adapters (megavideo.weights.adapters) and the seeded initial weights
(megavideo.models.init), in one process: what the multi-rank tests rely on, case by case."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from megavideo.config import ConfigError, load_config
from megavideo.models.init import init_normal, init_with, initialize, seed_of
from megavideo.weights.adapters import EarlierStage, model_differences

STAGE1, STAGE2 = "configs/stage1_tiny.yaml", "configs/stage2_tiny.yaml"


def _meta(cfg) -> dict:
    return {"config": cfg.to_dict()}


def test_an_earlier_stage_gives_its_video_encoder_resampled_to_this_stages_frames(tmp_path):
    earlier = load_config(STAGE1)
    later = load_config(STAGE2, [f"model.student.num_frames={2 * earlier.model.student.num_frames}"])
    adapter = EarlierStage(tmp_path, _meta(earlier), later)
    assert adapter.stage == 1 and adapter.frames[1] == 2 * adapter.frames[0]
    assert adapter.key("video.blocks.3.mlp.linear_fc1.weight") == "blocks.3.mlp.linear_fc1.weight"
    assert adapter.key("embed.pos_embed") == "embed.pos_embed"
    assert adapter.key("text.layers.0.mlp.linear_fc1.weight") is None  # not the video encoder
    old, new = adapter.frames
    width, per_frame = 8, 4
    shape = (1 + per_frame * new, width)
    assert adapter.stored_shape("video.embed.pos_embed", shape) == (1 + per_frame * old, width)
    assert adapter.stored_shape("blocks.0.mlp.linear_fc1.weight", (6, 4)) == (6, 4)
    stored = torch.arange((1 + per_frame * old) * width, dtype=torch.float32).reshape(-1, width)
    adapted = adapter.adapt("embed.pos_embed", stored)
    assert adapted.shape == shape and torch.equal(adapted[0], stored[0])  # the CLS row is kept
    weight = torch.ones(6, 4)
    assert adapter.adapt("blocks.0.mlp.linear_fc1.weight", weight) is weight


def test_an_earlier_stage_with_another_video_encoder_is_one_sentence(tmp_path):
    earlier = load_config(STAGE1, ["model.student.hidden_size=96", "model.student.num_heads=4",
                                   "model.student.mlp_hidden_size=384"])
    with pytest.raises(ConfigError, match=r"^checkpoint .* holds another video encoder: "
                                          r"model\.student\.hidden_size 96 != 80"):
        EarlierStage(tmp_path, _meta(earlier), load_config(STAGE2))


def test_model_differences_ignore_the_keys_that_shape_no_tensor():
    assert model_differences({"a": 1, "drop_path": 0.1, "b": {"c": 2}},
                             {"a": 1, "drop_path": 0.2, "b": {"c": 3}}) == ["model.b.c 2 != 3"]


def test_a_key_newer_than_the_checkpoint_is_no_difference():
    """A checkpoint written before model.substage (or the align section) existed resumes."""
    assert model_differences({"a": 1, "qformer": {"n": 2}},
                             {"a": 1, "substage": "instruct", "align": {"vtc": 1.0},
                              "qformer": {"n": 2, "text_input": False}}) == []
    assert model_differences({"a": 1}, {"a": 2, "new": 0}) == ["model.a 1 != 2"]


def test_seeds_are_stable_and_differ_by_name():
    assert seed_of(7, "blocks.0.weight") == seed_of(7, "blocks.0.weight") < 2**63
    assert len({seed_of(s, n) for s in (7, 8) for n in ("a", "b")}) == 4


def test_initialize_redraws_a_shard_of_the_whole_tensor_as_on_one_rank():
    """Two 'ranks' of a column split (tp 2) each keep their half of the tensor a single rank
    draws; a torch layer replays its own init, deterministic parameters are left alone."""

    def split(rank: int) -> nn.Module:
        module = nn.Module()
        module.weight = nn.Parameter(torch.empty(3, 4))
        module.weight.tensor_model_parallel, module.weight.partition_dim = True, 0
        init_with(module.weight, init_normal)
        module.norm = nn.Parameter(torch.ones(4))
        module.head = nn.Linear(4, 2)
        return module

    whole = nn.Module()
    whole.weight = init_with(nn.Parameter(torch.empty(6, 4)), init_normal)
    whole.norm = nn.Parameter(torch.ones(4))
    whole.head = nn.Linear(4, 2)
    names = ["weight", "norm", "head.weight", "head.bias"]

    def named(module):
        params = dict(module.named_parameters())
        return [(n, params[n]) for n in names]

    initialize(named(whole), [whole], seed=3, tp_rank=0, tp=1)
    shards = [split(rank) for rank in range(2)]
    for rank, module in enumerate(shards):
        initialize(named(module), [module], seed=3, tp_rank=rank, tp=2)
    assert torch.equal(torch.cat([m.weight for m in shards]), whole.weight)
    for name in ("norm", "head.weight", "head.bias"):
        for module in shards:
            assert torch.equal(module.get_parameter(name), whole.get_parameter(name)), name
    assert torch.equal(whole.norm, torch.ones(4))
    # the draw itself: N(0, 0.02) from the generator seeded by (seed, name), nothing else
    with torch.random.fork_rng():
        torch.manual_seed(seed_of(3, "weight"))
        expected = torch.empty(6, 4).normal_(0.0, 0.02)
    assert torch.equal(whole.weight, expected)


def test_the_schema_still_builds_from_its_defaults():
    assert dataclasses.asdict(load_config(STAGE1))["train"]["fusions"] == ["auto"]
