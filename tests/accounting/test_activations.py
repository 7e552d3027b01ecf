"""Activation memory (issue 8): the bytes saved for backward per transformer layer, measured with
autograd's saved-tensor hooks, against the analytic formulas of megavideo.accounting.activations.

One 2-rank spawn measures every case: the stage-1 student's block stack (96 wide, 4 heads, MLP 384,
128 tokens, micro-batch 2, fp32) at tp 1, tp 2 and tp 2 with SP, for no, selective and full
recomputation; the tiny student's own shape (5 heads padded to 6 at tp 2, drop path on); bf16 at
tp 2 with SP; and the stage-3 LLM decoder layer (GQA 4 heads / 2 groups, SwiGLU 256).

Measured (bytes per layer per micro-batch on one rank) = formula, exactly, in every case, e.g.
the ViT, no recomputation: tp1 2,887,680; tp2 1,839,104; tp2+SP 1,444,864; the tests assert
equality. SP divides the layer's bytes by tp except the q/k-norm 1/rms (8·s·b bytes: every rank
normalises all tokens over the full width) and, under selective recomputation, the checkpoint's
4-byte mask-type tensor: tp2+SP = tp1 / 2 + 1,024 here (0.07 %).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from megavideo.accounting.activations import SavedTensors, llm_layer_bytes, vit_layer_bytes
from tests.accounting import activations_worker
from tests.accounting.activations_worker import MICRO_BATCH, TOKENS
from tests.distributed import spawn

UNFUSED = ["train.attention=unfused"]  # megatron-core's DotProductAttention: the score matrix
VIT = ["model.student.hidden_size=96", "model.student.num_heads=4",
       "model.student.mlp_hidden_size=384", "model.student.drop_path=0.0"]
LLM = ["model.llm.hidden_size=96", "model.llm.num_heads=4", "model.llm.num_kv_heads=2",
       "model.llm.mlp_hidden_size=256"]
RECOMPUTE = ("none", "selective", "full")
LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2_sp": (2, True)}

# name: (kind, tp, sp, recompute, precision, overrides, formula)
CASES = {
    f"vit_{layout}_{rec}": ("vit", tp, sp, rec, "fp32", VIT + UNFUSED,
                            lambda tp=tp, sp=sp, rec=rec: vit_layer_bytes(
                                96, 4, 384, TOKENS, MICRO_BATCH, tp, sp, rec, 4))
    for layout, (tp, sp) in LAYOUTS.items() for rec in RECOMPUTE
}
CASES["vit_tiny_padded_tp2_sp"] = (
    "vit", 2, True, "none", "fp32", UNFUSED,
    lambda: vit_layer_bytes(80, 5, 320, TOKENS, MICRO_BATCH, 2, True, "none", 4, drop_path=True))
CASES["vit_bf16_tp2_sp"] = (
    "vit", 2, True, "none", "bf16", VIT + UNFUSED,
    lambda: vit_layer_bytes(96, 4, 384, TOKENS, MICRO_BATCH, 2, True, "none", 2))
CASES["llm_tp1_none"] = (
    "llm", 1, False, "none", "fp32", LLM + UNFUSED,
    lambda: llm_layer_bytes(96, 4, 2, 256, TOKENS, MICRO_BATCH, 1, False, "none", 4))
for _rec in RECOMPUTE:
    CASES[f"llm_tp2_sp_{_rec}"] = (
        "llm", 2, True, _rec, "fp32", LLM + UNFUSED,
        lambda rec=_rec: llm_layer_bytes(96, 4, 2, 256, TOKENS, MICRO_BATCH, 2, True, rec, 4))
# PyTorch's SDPA (the default on the CPU: its flash kernel) saves the log-sum-exp rows instead of
# the score matrix, as the "flash" formula says (for the LLM's grouped-query attention, with k and
# v repeated to the query heads: the "sdpa" formula)
for _layout, (_tp, _sp) in LAYOUTS.items():
    CASES[f"vit_{_layout}_none_sdpa"] = (
        "vit", _tp, _sp, "none", "fp32", VIT,
        lambda tp=_tp, sp=_sp: vit_layer_bytes(96, 4, 384, TOKENS, MICRO_BATCH, tp, sp, "none", 4,
                                               "flash"))
CASES["vit_tiny_padded_tp2_sp_sdpa"] = (
    "vit", 2, True, "none", "fp32", [],
    lambda: vit_layer_bytes(80, 5, 320, TOKENS, MICRO_BATCH, 2, True, "none", 4, "flash",
                            drop_path=True))
CASES["vit_bf16_tp2_sp_sdpa"] = (
    "vit", 2, True, "none", "bf16", VIT,
    lambda: vit_layer_bytes(96, 4, 384, TOKENS, MICRO_BATCH, 2, True, "none", 2, "flash"))
for _name, _tp, _sp in (("llm_tp1_none_sdpa", 1, False), ("llm_tp2_sp_none_sdpa", 2, True)):
    CASES[_name] = (
        "llm", _tp, _sp, "none", "fp32", LLM,
        lambda tp=_tp, sp=_sp: llm_layer_bytes(96, 4, 2, 256, TOKENS, MICRO_BATCH, tp, sp, "none",
                                               4, "sdpa"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, float]:
    out = tmp_path_factory.mktemp("activations") / "measured.json"
    cases = [(name, *case[:5], list(case[5])) for name, case in CASES.items()]
    spawn(2, activations_worker.measure, cases, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_measured_matches_formula(measured, name):
    formula = CASES[name][-1]()
    assert measured[name] == formula, (name, measured[name], formula)


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_sequence_parallel_divides_by_tp(measured, recompute):
    tp1, sp = measured[f"vit_tp1_{recompute}"], measured[f"vit_tp2_sp_{recompute}"]
    # all but the q/k-norm statistics and the selective checkpoint's mask-type tensor
    kept = {"none": 8 * TOKENS * MICRO_BATCH, "selective": 8 * TOKENS * MICRO_BATCH + 4, "full": 0}
    assert sp == (tp1 - kept[recompute]) / 2 + kept[recompute]
    # without SP the residual stream stays whole: less than tp1, more than tp1 / 2
    assert tp1 / 2 < measured[f"vit_tp2_{recompute}"] <= tp1


def test_recomputation_orders(measured):
    for layout in LAYOUTS:
        none, sel, full = (measured[f"vit_{layout}_{rec}"] for rec in RECOMPUTE)
        assert full < sel < none


def test_saved_tensors_counts_storages_once_and_skips_parameters():
    weight = nn.Parameter(torch.ones(8, 8))
    x = torch.randn(16, 8, requires_grad=True)
    with SavedTensors() as saved:
        y = x * x  # saves x twice: one storage, 16 x 8
        z = y[:4].exp()  # saves its output: 4 x 8
        w = y @ weight.t()  # saves y (16 x 8) and a view of the weight (skipped)
    (z.sum() + w.sum()).backward()
    assert saved.bytes == (16 * 8 + 4 * 8 + 16 * 8) * 4
