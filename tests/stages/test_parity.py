"""Parallelism is proven by parity: one seed, one global batch, the same loss and gradients.

A reference runs at tp 1 / pp 1 on one rank; each layout then loads the reference's weights (its
teachers' too) and runs the same step. Layouts share one process group per world size: a layout
smaller than the world fills the remaining ranks with data parallelism. The tiny preset has 5
student heads (padded to 8 at tp 4), 17 tokens (padded to 18/20 under SP), drop path on, and 6
layers (split 1/1/2/2 over 4 pipeline stages, so aligners and their tied position embeddings span
stages). fp32 on CPU.

Stage 2 (VTC/VTM/MLM and the audio variants) is checked the same way, in the same process
groups (see STAGE2 below).

Every run uses PyTorch's SDPA for the core attention (train.attention=auto on the CPU); a second
reference per stage on megatron-core's DotProductAttention (the whole score matrix) checks every
layout against it too.

Tolerances (fp32, summation order only):
- losses: relative 1e-6 (measured: <= 1.1e-8);
- gradients: |g - g_ref| <= 1e-5 * max|g_ref| + 1e-8 * (largest gradient in the model), per tensor
  (measured: <= 5.2e-7 of max|g_ref|; the absolute term covers tensors whose exact gradient is
  zero, e.g. biases of the attention pool's keys, which only shift every score equally);
- parameters after 3 AdamW steps (eps 1e-6): absolute 2e-6 (measured: 1.2e-7).
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from megavideo.models.lora import is_lora
from tests.distributed import spawn
from tests.stages import parity_worker

STEPS = 3
WORLD2 = [
    ("tp2", ["parallel.tp=2"], 0),
    ("tp2_sp", ["parallel.tp=2", "parallel.sp=true"], 0),
    ("pp2", ["parallel.pp=2"], 0),
    ("pp2_full_recompute", ["parallel.pp=2", "train.recompute=full"], 0),
    ("tp2_sp_selective_recompute", ["parallel.tp=2", "parallel.sp=true", "train.recompute=selective"], 0),
    ("dp2_distopt", ["parallel.distributed_optimizer=true"], 0),
    # a whole copy of each teacher per rank, each on half of the micro-batch's clips
    ("tp2_sp_whole_teachers", ["parallel.tp=2", "parallel.sp=true", "parallel.teacher_tp=1"], 0),
    ("dp2_distopt_steps", ["parallel.distributed_optimizer=true"], STEPS),
    # the gradient reduce and the parameter gather overlapped (bucketed, driven by the schedule)
    ("dp2_distopt_overlap_steps", ["parallel.distributed_optimizer=true",
                                   "parallel.overlap_grad_reduce=true",
                                   "parallel.overlap_param_gather=true"], STEPS),
]
WORLD4 = [
    ("tp4_sp", ["parallel.tp=4", "parallel.sp=true"], 0),
    # the teachers at tp 2 (3 heads padded to 4) in two groups, each on half of the clips
    ("tp4_sp_teacher_tp2", ["parallel.tp=4", "parallel.sp=true", "parallel.teacher_tp=2"], 0),
    ("pp4", ["parallel.pp=4"], 0),
    ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2"], 0),
    ("pp2_tp2_sp", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true"], 0),
    ("tp4_steps", ["parallel.tp=4"], STEPS),
]


# Stage 2: the reference holds the global batch of 8 on one rank (one micro-batch); with data
# parallelism each rank holds 4 of the 8: the contrast all-gathers the projections and matching
# fetches its hard negatives from the other rank, so the dp2 loss is the single-process loss over
# the global batch, not an average of two 4-sample losses. The tiny config has the toy BERT
# (4 layers, 2 fused), the toy BEATs (not frozen, so its gradients are compared too; every fourth
# synthetic item has no audio) and all six terms on.
STAGE2 = str(Path(__file__).resolve().parents[2] / "configs" / "stage2_tiny.yaml")
STAGE2_BASE = ("train.micro_batch=8",)
STAGE2_WORLD2 = [
    ("s2_tp2_sp", ["parallel.tp=2", "parallel.sp=true"], 0),
    ("s2_dp2", ["train.micro_batch=4"], 0),
    ("s2_pp2", ["parallel.pp=2"], 0),
]
STAGE2_WORLD4 = [
    ("s2_pp2_tp2_sp", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true"], 0),
    ("s2_dp2_tp2_sp_distopt", ["parallel.tp=2", "parallel.sp=true", "train.micro_batch=4",
                               "parallel.distributed_optimizer=true"], 0),
]

# Stage 2's image steps (every step one here): 1-frame synthetic clips at their own mask ratio
# and position table (model.image_pos_embed own), the audio side left out at weight 0
STAGE2_IMAGES = STAGE2_BASE + ("data.image_fraction=1.0", "model.image_pos_embed=own")
STAGE2_IMAGES_WORLD4 = [
    ("s2i_pp2_tp2_sp", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true"], 0),
]


# Stage 3: the reference runs the LLM at tp 1 / pp 1 with the video encoder beside it; the
# layouts split the LLM over tp 2 (+SP) and pp 2 (and 2 x 2 virtual stages) while the video
# encoder and QFormer stay on the first pipeline stage at tp 1 (two copies, each encoding half of
# the micro-batch) or tp 2. Two micro-batches of 4 conversations; the loss is the mean over the
# step's answer tokens. LoRA (adapters only, under TP and SP) has its own reference.
STAGE3 = str(Path(__file__).resolve().parents[2] / "configs" / "stage3_tiny.yaml")
UNFUSED = ("train.attention=unfused",)
STAGE3_BASE = ("train.micro_batch=4", "parallel.encoder_tp=0")
STAGE3_LORA = STAGE3_BASE + ("model.llm.tuning=lora", "model.llm.lora_rank=4",
                              "model.llm.lora_dropout=0")
STAGE3_WORLD2 = [
    ("s3_tp2_sp_etp1", ["parallel.tp=2", "parallel.sp=true", "parallel.encoder_tp=1"], 0),
    ("s3_pp2", ["parallel.pp=2"], 0),
    ("s3_dp2_distopt", ["train.micro_batch=2", "parallel.distributed_optimizer=true"], 0),
]
STAGE3_LORA_WORLD2 = [
    ("s3_lora_tp2_sp", ["parallel.tp=2", "parallel.sp=true"], 0),
]
STAGE3_WORLD4 = [
    ("s3_pp2_tp2_sp_etp1", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true",
                            "parallel.encoder_tp=1"], 0),
    ("s3_pp2_vpp2_tp2_etp2", ["parallel.pp=2", "parallel.vpp=2", "parallel.tp=2",
                              "parallel.encoder_tp=2", "parallel.sp=true"], 0),
    ("s3_pp2_vpp2_etp1_dp2", ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch=2"], 0),
]

# Stage 3's sub-stages (each against its own one-rank reference). align: the QFormer's VTM and
# captioning with the video encoder training too (so its gradients are compared), the hard
# negatives drawn from the data-parallel micro-batch; its VTC is left to
# tests/stages/test_official_recipe.py: at initialisation the toy QFormer's caption vectors are
# nearly one direction, so the contrast's gradient is a difference of nearly equal terms whose
# rounding (relative 1e-3 between layouts, measured) no fp32 tolerance separates from an error.
# caption: captions into the frozen LLM at pp 2 x tp 2 + SP; text_input: the instruction read
# by the QFormer.
ALIGN = str(Path(__file__).resolve().parents[2] / "configs" / "stage3_align_tiny.yaml")
ALIGN_BASE = ("train.micro_batch=8", "parallel.tp=1", "parallel.sp=false",
              "model.video_frozen=false", "model.align.vtc=0")
ALIGN_WORLD2 = [("a_tp2_sp", ["parallel.tp=2", "parallel.sp=true"], 0),
                ("a_dp2", ["train.micro_batch=4"], 0)]
ALIGN_WORLD4 = [("a_dp2_tp2_sp", ["parallel.tp=2", "parallel.sp=true", "train.micro_batch=4"], 0)]
CAPTION = str(Path(__file__).resolve().parents[2] / "configs" / "stage3_caption_tiny.yaml")
CAPTION_BASE = ("train.micro_batch=4", "parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
                "parallel.encoder_tp=0")
CAPTION_WORLD4 = [("c_pp2_tp2_sp_etp1", ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true",
                                         "parallel.encoder_tp=1"], 0)]
TEXT_INPUT = STAGE3_BASE + ("model.qformer.text_input=true",
                            f"model.qformer.vocab_file={Path(STAGE3).parent / 'vocab' / 'synthetic.txt'}")
TEXT_INPUT_WORLD2 = [("t_tp2_sp_etp1", ["parallel.tp=2", "parallel.sp=true",
                                        "parallel.encoder_tp=1"], 0)]
SUBSTAGES = {"align": (ALIGN_WORLD2 + ALIGN_WORLD4, "align"),
             "caption": (CAPTION_WORLD4, "caption"), "text_input": (TEXT_INPUT_WORLD2, "text")}


def _merged(out: Path, names: list[str]) -> dict:
    results = {}
    for name in names:
        merged: dict = {"grads": {}, "trained": {}, "initial": {}, "padding_max": 0.0}
        files = sorted(glob.glob(str(out / f"{name}.pp*.pt")))
        assert files, f"layout {name} wrote nothing"
        for path in files:
            part = torch.load(path)
            for key in ("loss", "losses"):
                if key in part:
                    merged[key] = part[key]
            for key in ("grads", "trained", "initial"):
                merged[key].update(part.get(key, {}))
            merged["padding_max"] = max(merged["padding_max"], part.get("padding_max", 0.0))
        results[name] = merged
    return results


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    """Both stages' references and layouts, one spawn per world size."""
    out = tmp_path_factory.mktemp("parity")
    ref, ref2 = out / "reference.pt", out / "reference_stage2.pt"
    ref3, ref3_lora = out / "reference_stage3.pt", out / "reference_stage3_lora.pt"
    ref2i = out / "reference_stage2_images.pt"
    w = parity_worker
    spawn(1, w.sequence, [(w.reference, (str(ref), STEPS)),
                          (w.reference, (str(ref2), 0, STAGE2, STAGE2_BASE)),
                          (w.reference, (str(ref2i), 0, STAGE2, STAGE2_IMAGES)),
                          (w.reference, (str(ref3), 0, STAGE3, STAGE3_BASE)),
                          (w.reference, (str(ref3_lora), 0, STAGE3, STAGE3_LORA)),
                          (w.reference, (str(out / "ref_align.pt"), 0, ALIGN, ALIGN_BASE)),
                          (w.reference, (str(out / "ref_caption.pt"), 0, CAPTION, CAPTION_BASE)),
                          (w.reference, (str(out / "ref_text.pt"), 0, STAGE3, TEXT_INPUT))])
    spawn(2, w.sequence, [(w.layouts, (str(ref), WORLD2, str(out))),
                          (w.layouts, (str(ref2), STAGE2_WORLD2, str(out), STAGE2, STAGE2_BASE)),
                          (w.layouts, (str(ref3), STAGE3_WORLD2, str(out), STAGE3, STAGE3_BASE)),
                          (w.layouts, (str(ref3_lora), STAGE3_LORA_WORLD2, str(out), STAGE3,
                                       STAGE3_LORA)),
                          (w.layouts, (str(out / "ref_align.pt"), ALIGN_WORLD2, str(out), ALIGN,
                                       ALIGN_BASE)),
                          (w.layouts, (str(out / "ref_text.pt"), TEXT_INPUT_WORLD2, str(out),
                                       STAGE3, TEXT_INPUT))])
    spawn(4, w.sequence, [(w.layouts, (str(ref), WORLD4, str(out))),
                          (w.layouts, (str(ref2), STAGE2_WORLD4, str(out), STAGE2, STAGE2_BASE)),
                          (w.layouts, (str(ref2i), STAGE2_IMAGES_WORLD4, str(out), STAGE2,
                                       STAGE2_IMAGES)),
                          (w.layouts, (str(ref3), STAGE3_WORLD4, str(out), STAGE3, STAGE3_BASE)),
                          (w.layouts, (str(out / "ref_align.pt"), ALIGN_WORLD4, str(out), ALIGN,
                                       ALIGN_BASE)),
                          (w.layouts, (str(out / "ref_caption.pt"), CAPTION_WORLD4, str(out),
                                       CAPTION, CAPTION_BASE))])
    # megatron-core's unfused attention (the score matrix) at tp 1 / pp 1, in a process of its own
    # (megatron-core's GPTModel pins its attention backend in NVTE_* variables for the process)
    unfused = [out / f"unfused{stage}.pt" for stage in (1, 2, 3)]
    spawn(1, w.sequence, [(w.reference, (str(unfused[0]), 0, None, UNFUSED)),
                          (w.reference, (str(unfused[1]), 0, STAGE2, STAGE2_BASE + UNFUSED)),
                          (w.reference, (str(unfused[2]), 0, STAGE3, STAGE3_BASE + UNFUSED))])
    stage1 = _merged(out, [n for n, _, _ in WORLD2 + WORLD4])
    stage2 = _merged(out, [n for n, _, _ in STAGE2_WORLD2 + STAGE2_WORLD4])
    stage3 = _merged(out, [n for n, _, _ in STAGE3_WORLD2 + STAGE3_WORLD4])
    stage3_lora = _merged(out, [n for n, _, _ in STAGE3_LORA_WORLD2])
    images = _merged(out, [n for n, _, _ in STAGE2_IMAGES_WORLD4])
    substages = {key: (torch.load(out / f"ref_{ref}.pt"), _merged(out, [n for n, _, _ in cases]))
                 for key, (cases, ref) in SUBSTAGES.items()}
    return ((torch.load(ref), stage1), (torch.load(ref2), stage2),
            (torch.load(ref3), stage3 | stage3_lora), torch.load(ref3_lora),
            [torch.load(path) for path in unfused], (torch.load(ref2i), images), substages)


@pytest.fixture(scope="module")
def runs(all_runs):
    return all_runs[0]


def _assert_grads_match(ref: dict, grads: dict) -> None:
    assert set(grads) == set(ref), sorted(set(ref) ^ set(grads))
    largest = max(g.abs().max().item() for g in ref.values())
    for name, expected in ref.items():
        bound = 1e-5 * expected.abs().max().item() + 1e-8 * largest
        error = (grads[name] - expected).abs().max().item()
        assert error <= bound, f"{name}: gradient error {error:.3e} > {bound:.3e}"


@pytest.mark.parametrize("name", [n for n, _, s in WORLD2 + WORLD4 if not s])
def test_loss_and_gradients_match_reference(runs, name):
    ref, results = runs
    got = results[name]
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    _assert_grads_match(ref["grads"], got["grads"])


@pytest.mark.parametrize("name", [n for n, _, s in WORLD2 + WORLD4 if s])
def test_parameters_match_reference_after_optimizer_steps(runs, name):
    ref, results = runs
    got = results[name]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert set(got["trained"]) == set(ref["trained"])
    for pname, expected in ref["trained"].items():
        error = (got["trained"][pname] - expected).abs().max().item()
        assert error <= 2e-6, f"{pname}: parameter error {error:.3e}"


def test_overlapped_communication_changes_no_number(runs):
    _, results = runs
    plain, overlapped = results["dp2_distopt_steps"], results["dp2_distopt_overlap_steps"]
    assert overlapped["losses"] == plain["losses"]
    for name, value in plain["trained"].items():
        assert torch.equal(overlapped["trained"][name], value), name


def test_padded_heads_change_nothing_and_stay_zero(runs):
    """tp 4 pads 5 heads to 8 (3 zero heads) and 3 teacher heads to 4: after 3 AdamW steps with
    weight decay the padding is still exactly zero and the model still equals the unpadded one."""
    _, results = runs
    assert results["tp4_steps"]["padding_max"] == 0.0
    assert results["tp4_sp"]["loss"]  # the padded model's loss terms matched the reference above


def test_stage2_reference_computes_every_term(all_runs):
    ref, _ = all_runs[1]
    names = {k for k in ref["loss"] if k.startswith("loss/")}
    assert names == {f"loss/{t}" for t in ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")}
    assert all(v > 0 for v in ref["loss"].values())


@pytest.mark.parametrize("name", [n for n, _, _ in STAGE2_WORLD2 + STAGE2_WORLD4])
def test_stage2_loss_and_gradients_match_reference(all_runs, name):
    ref, results = all_runs[1]
    got = results[name]
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    _assert_grads_match(ref["grads"], got["grads"])


def test_stage2_image_steps_match_reference(all_runs):
    """An image step at pp 2 x tp 2 + SP against one rank: VTC, VTM and MLM only (no sound), the
    image's own position table trained, the video table and the audio side with zero
    gradients."""
    ref, results = all_runs[5]
    got = results["s2i_pp2_tp2_sp"]
    assert {k for k in ref["loss"] if k.startswith("loss/") and ref["loss"][k]} == {
        "loss/vtc", "loss/vtm", "loss/mlm"}
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    _assert_grads_match(ref["grads"], got["grads"])
    assert ref["grads"]["embed.img_pos_embed"].abs().max() > 0
    assert ref["grads"]["embed.pos_embed"].abs().max() == 0
    assert all(g.abs().max() == 0 for n, g in ref["grads"].items() if n.startswith("audio."))


def test_stage3_reference_trains_every_part(all_runs):
    ref, _ = all_runs[2]
    assert ref["loss"]["loss/lm"] > 0
    parts = {name.split(".")[0] for name, g in ref["grads"].items() if g.abs().max() > 0}
    assert parts == {"video", "qformer", "llm"}
    llm_trained = {name for name in all_runs[3]["grads"] if name.startswith("llm.")}
    assert llm_trained and all(is_lora(name) for name in llm_trained)  # adapters only


@pytest.mark.parametrize("name", [n for n, _, _ in STAGE3_WORLD2 + STAGE3_WORLD4
                                  + STAGE3_LORA_WORLD2])
def test_stage3_loss_and_gradients_match_reference(all_runs, name):
    ref, results = all_runs[2]
    if "lora" in name:
        ref = all_runs[3]
    got = results[name]
    assert got["loss"]["loss/lm"] == pytest.approx(ref["loss"]["loss/lm"], rel=1e-6)
    _assert_grads_match(ref["grads"], got["grads"])


def test_the_align_reference_computes_its_terms_and_trains_the_video_encoder(all_runs):
    ref, _ = all_runs[6]["align"]
    assert {k for k in ref["loss"] if k.startswith("loss/")} == {"loss/vtm", "loss/cap"}
    parts = {name.split(".")[0] for name, g in ref["grads"].items() if g.abs().max() > 0}
    assert parts == {"video", "qformer", "itm_head", "cap_head"}  # the projections: VTC's


def test_the_caption_reference_leaves_the_llm_frozen(all_runs):
    ref, _ = all_runs[6]["caption"]
    assert {name.split(".")[0] for name in ref["grads"]} == {"video", "qformer"}


@pytest.mark.parametrize("key, name", [(k, n) for k, (cases, _) in SUBSTAGES.items()
                                       for n, _, _ in cases])
def test_substages_match_their_reference(all_runs, key, name):
    ref, results = all_runs[6][key]
    got = results[name]
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    _assert_grads_match(ref["grads"], got["grads"])


@pytest.mark.parametrize("index, name", [(0, n) for n, _, s in WORLD2 + WORLD4 if not s]
                         + [(1, n) for n, _, _ in STAGE2_WORLD2 + STAGE2_WORLD4]
                         + [(2, n) for n, _, _ in STAGE3_WORLD2 + STAGE3_WORLD4])
def test_sdpa_matches_megatrons_unfused_attention(all_runs, index, name):
    """Every layout runs PyTorch's SDPA (train.attention=auto on the CPU); each matches the
    tp 1 / pp 1 reference on megatron-core's DotProductAttention (the whole score matrix) within
    the parity tolerances (measured: see the module docstring)."""
    ref = all_runs[4][index]
    got = all_runs[index][1][name]
    for term, value in ref["loss"].items():
        assert got["loss"][term] == pytest.approx(value, rel=1e-6, abs=1e-9), term
    _assert_grads_match(ref["grads"], got["grads"])


@pytest.mark.parametrize("index, name", [(0, n) for n, _, _ in WORLD2 + WORLD4]
                         + [(1, n) for n, _, _ in STAGE2_WORLD2 + STAGE2_WORLD4]
                         + [(2, n) for n, _, _ in STAGE3_WORLD2 + STAGE3_WORLD4
                            + STAGE3_LORA_WORLD2])
def test_a_seed_starts_every_layout_from_the_same_weights(all_runs, index, name):
    """Fresh runs, before any weight is loaded: every parameter (the teachers' too) is drawn from
    the seed and its name as on one rank, so each layout starts bit for bit where tp 1 / pp 1
    does (padding heads zero, as the reference has none)."""
    ref, results = all_runs[index]
    if "lora" in name:
        ref = all_runs[3]
    got = results[name]["initial"]
    assert set(got) == set(ref["initial"]), sorted(set(got) ^ set(ref["initial"]))
    for pname, expected in ref["initial"].items():
        assert torch.equal(got[pname], expected), pname
