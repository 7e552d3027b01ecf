"""Stage 2 beyond parity: initialisation from a stage-1 checkpoint, clips without audio, the
objectives' building blocks, captioned manifests, retrieval that learns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataloaders.audio import AudioSpec, clip_fbank
from dataloaders.clips import truncate, write_clip, write_image
from dataloaders.manifest import Manifest, build_manifest
from megavideo.config import ConfigError, load_config
from megavideo.models.embedding import frame_mean, interpolate_frames
from megavideo.models.objectives import contrastive_loss, hard_negatives, mlm_inputs
from megavideo.stages.stage2 import random_visible
from megavideo.training import data
from tests.distributed import spawn, torchrun
from tests.stages import stage2_worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_init")
    out = root / "result.pt"
    spawn(2, stage2_worker.init_from_stage1, str(root), str(out))
    return torch.load(out)


def test_stage1_checkpoint_initialises_the_video_encoder_at_another_layout(initialised):
    """Saved at tp2 + SP, loaded at pp2: every video-encoder tensor equals stage 1's, the
    position embedding resampled from 4 to 2 frames."""
    s1, s2 = initialised["stage1"], initialised["stage2"]
    assert initialised["start"] == 0
    video = [k for k in s2 if k.split(".")[0] in ("embed", "blocks", "pool")]
    assert len(video) > 30 and not [k for k in s2 if k.startswith("clip_aligners")]
    for name in video:
        if name == "embed.img_pos_embed":  # the image table: the stage-1 table's frame mean
            expected = frame_mean(s1["embed.pos_embed"], 4, cls_token=True)
        else:
            expected = s1[name]
        if name == "embed.pos_embed":
            expected = interpolate_frames(expected, 4, 2, cls_token=True)
        assert torch.equal(s2[name], expected), name
    assert s2["embed.pos_embed"].shape[0] == 1 + 2 * 16
    assert s2["embed.img_pos_embed"].shape[0] == 1 + 16


def test_stage2_trains_from_stage1_and_with_clips_without_audio(initialised):
    for metrics in (initialised["with_audio"], initialised["silent"]):
        assert {"loss/vtc", "loss/avtc", "loss/avmlm"} <= set(metrics)
    # silent clips: the audio tokens are masked out of the fusion memory and the pooled audio is
    # zero, so the audio encoder gets no gradient at all
    assert initialised["audio_grad_max"] == 0.0


def test_contrastive_loss_of_identical_pairs_is_low_and_of_positives_shared():
    x = torch.eye(4)
    idx = torch.arange(4)
    low = contrastive_loss(x, x, idx, idx, torch.tensor(0.07), None)
    assert low < 1e-3
    # two samples of one item: both are positives of each other, so swapping them costs nothing
    idx = torch.tensor([0, 0, 1, 2])
    swapped = contrastive_loss(x, x[[1, 0, 2, 3]], idx, idx, torch.tensor(0.07), None)
    same = contrastive_loss(x, x, idx, idx, torch.tensor(0.07), None)
    assert swapped == pytest.approx(same.item())


def test_hard_negatives_never_pick_the_same_item():
    sim = torch.tensor([[9.0, 8.0, 0.0], [8.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    idx = torch.tensor([0, 0, 1])
    picks = hard_negatives(sim, idx, idx, torch.arange(3))
    assert picks[0] == 2 and picks[1] == 2 and picks[2] in (0, 1)


def test_mlm_masking_spares_padding_and_cls_and_marks_labels():
    ids = torch.tensor([[2] + [7] * 40 + [3] + [0] * 8])  # [CLS] words [SEP] [PAD]...
    special = {"pad": 0, "cls": 2, "mask": 4}
    masked, labels = mlm_inputs(ids, special, 16, 0.5, torch.tensor([0]))
    chosen = labels != -100
    assert not chosen[0, 0] and not chosen[0, 42:].any()
    assert 10 <= int(chosen.sum()) <= 32
    assert torch.equal(labels[chosen], ids[chosen])
    assert (masked[chosen] == 4).float().mean() > 0.5


def test_random_visible_keeps_cls_and_a_share_of_each_frame():
    visible = random_visible(torch.tensor([0, 1]), frames=4, per_frame=16, keep=3)
    assert visible.shape == (2, 13) and (visible[:, 0] == 0).all()
    assert (visible[:, 1:].diff(dim=1) > 0).all()  # sorted, no repeats
    for row in visible:
        assert ((row[1:] - 1) // 16).tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert not torch.equal(visible[0], visible[1])


def test_retrieval_learns_colour_patterns(tmp_path):
    """100 steps of the tiny stage-2 model (one CPU rank, 16 clips a step, VTC + VTM + MLM) on
    synthetic clips whose caption names their two colours in order; then launch.evaluate on one
    held-out clip per pattern. Chance is 1/36 = 2.8% R@1; the bar is 30% in both directions
    (measured: 61.1% text->video, 58.3% video->text, R@5 100%; with audio and 150 steps 63.9%
    and 58.3%). Zero-shot classification of the same clips by their 36 patterns through the
    official 16 prompts: top-1 33.3%, top-5 80.6% (chance 2.8% and 13.9%)."""
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false", f"run.dir={tmp_path}",
              "run.tensorboard=false", "model.audio.enabled=false"]
    train = subprocess.run(
        [*torchrun(1), "-m", "launch.train", "configs/stage2_tiny.yaml", *layout,
         "train.steps=100", "train.warmup_steps=10", "train.global_batch=16",
         "train.micro_batch=16"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {k for k in first if k.startswith("loss/")} == {"loss/vtc", "loss/vtm", "loss/mlm"}
    evaluate = subprocess.run(
        [*torchrun(1), "-m", "launch.evaluate", "configs/stage2_tiny.yaml",
         str(tmp_path / "checkpoints"), *layout], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert result["sim/t2v_r1"] >= 30.0 and result["sim/v2t_r1"] >= 30.0, result
    assert {"sim/r_mean", "dsl/r_mean", "match/r_mean"} <= set(result)
    assert "text->video" in evaluate.stdout
    classify = subprocess.run(
        [*torchrun(1), "-m", "launch.evaluate", "configs/stage2_tiny.yaml",
         str(tmp_path / "checkpoints"), *layout, "--classify", "--k-test", "0"], cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    assert classify.returncode == 0, classify.stderr[-3000:]
    scores = json.loads((tmp_path / "classification.json").read_text())
    assert scores["classes"] == 36 and scores["top1"] >= 20.0 and scores["top5"] >= 50.0, scores
    assert "zero-shot classification over 36 classes" in classify.stdout


def test_evaluate_refuses_a_missing_checkpoint_in_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", "configs/stage2_tiny.yaml",
                           str(tmp_path / "nothing"), "parallel.tp=1", "parallel.pp=1",
                           "parallel.sp=false"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nothing'} holds no MegaVideo checkpoint (no metadata.json).")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """Six captioned clips in InternVideo2's annotation format (``caption`` strings, ``captions``
    lists, ``asr_captions``), four with a sound track, and one more that breaks after probing."""
    d = tmp_path_factory.mktemp("captioned")
    rows = []
    for i in range(6):
        name = write_clip(d / f"clip{i}", "vp9" if i % 2 else "h264", frames=16 + 2 * i,
                          width=72, height=64, audio=i < 4, tone=300.0 + 100 * i).name
        key = "caption" if i % 2 else "captions"
        rows.append({"video": name, key: f"clip {i}" if i % 2 else [f"clip {i}", f"video {i}"],
                     "asr_captions": "speech"})
    broken = write_clip(d / "broken", "vp9", frames=30)
    rows.append({"video": broken.name, "caption": "broken"})
    (d / "annotations.json").write_text(json.dumps(rows))
    manifest = d / "manifest.jsonl"
    build_manifest(d / "annotations.json", manifest, root=d, workers=1, progress=False)
    truncate(broken, 0.3)
    return manifest


def test_manifest_carries_every_caption_key_and_audio(captioned):
    manifest = Manifest(captioned)
    assert len(manifest) == 7
    assert manifest.texts(0) == {"captions": ["clip 0", "video 0"], "asr_captions": "speech"}
    assert manifest.texts(1) == {"caption": "clip 1", "asr_captions": "speech"}
    assert manifest.has_audio.tolist() == [True] * 4 + [False] * 3
    assert manifest.captions(0, ["caption", "captions"]) == ["clip 0", "video 0"]
    drawn = {data.caption(manifest, 0, ["captions"], torch.Generator().manual_seed(s))
             for s in range(20)}
    assert drawn == {"clip 0", "video 0"}


def test_clip_fbank_of_a_clip_without_audio_is_zeros_and_says_why(captioned):
    spec = AudioSpec(seconds=0.5, bins=32, frames=48)
    manifest = Manifest(captioned)
    bank, reason = clip_fbank(manifest.path(0), 0.0, spec)
    assert reason is None and bank.shape == (48, 32) and bank.abs().sum() > 0
    bank, reason = clip_fbank(manifest.path(5), 0.0, spec)
    assert reason == "no audio" and not bank.any()


def test_stage2_refuses_a_manifest_with_uncaptioned_clips(captioned):
    cfg = load_config(ROOT / "configs/stage2_tiny.yaml", [
        "data.source=manifest", f"data.manifest={captioned}", "data.captions=[caption]"])
    with pytest.raises(ConfigError, match=r"^3 of 7 clips of data.manifest .* have no caption "
                                          r"under data.captions=\['caption'\]"):
        data.check(cfg)


@pytest.fixture(scope="module")
def manifest_run(captioned, tmp_path_factory):
    """3 steps at pp 2 on the captioned manifest: the first stage decodes clips and audio
    (skipping the broken file), the last reads their captions; it saves at the end."""
    run_dir = tmp_path_factory.mktemp("manifest_run")
    proc = subprocess.run(
        [*torchrun(2), "-m", "launch.train", "configs/stage2_tiny.yaml", "parallel.tp=1",
         "parallel.pp=2", "parallel.sp=false", "data.source=manifest", f"data.manifest={captioned}",
         "data.captions=[caption,captions]", "data.workers=0", "data.max_skip_rate=1.0",
         "train.steps=3", "train.warmup_steps=0", "train.global_batch=4", "train.micro_batch=2",
         f"run.dir={run_dir}", "run.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, run_dir


def test_stage2_trains_on_a_captioned_manifest_across_pipeline_stages(manifest_run):
    proc, run_dir = manifest_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"loss/vtc", "loss/vtm", "loss/mlm", "loss/avtc", "loss/avtm", "loss/avmlm"} <= set(rows[0])
    assert sum(r["data/skipped"] for r in rows) >= 1
    assert "broken" in proc.stderr


def test_stage2_mixes_image_and_video_steps_from_two_manifests(captioned, tmp_path):
    """Half the steps on still images (an image manifest of PNGs and JPEGs built from official
    image rows) at pp 2: the first stage decodes 1-frame clips, the last reads their captions;
    image steps have no audio-video terms. The seed puts steps 1-3 of 6 on images."""
    rows = []
    for i in range(4):
        path = write_image(tmp_path / f"image{i}", "png" if i % 2 else "jpeg", index=i,
                           width=72, height=64)
        rows.append({"image": path.name, "caption": f"picture {i}"})
    (tmp_path / "images.json").write_text(json.dumps(rows))
    images = tmp_path / "images.jsonl"
    build_manifest(tmp_path / "images.json", images, root=tmp_path, workers=1, progress=False)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in captioned.read_text().splitlines()
                            if "broken" not in line))
    proc = subprocess.run(
        [*torchrun(2), "-m", "launch.train", "configs/stage2_tiny.yaml", "parallel.tp=1",
         "parallel.pp=2", "parallel.sp=false", "data.source=manifest", f"data.manifest={good}",
         f"data.image_manifest={images}", "data.image_fraction=0.5",
         "data.captions=[caption,captions]", "data.workers=0", "train.steps=6",
         "train.warmup_steps=0", "train.global_batch=4", "train.micro_batch=2",
         "model.image_pos_embed=own", f"run.dir={tmp_path / 'run'}", "run.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/image"] for r in metrics] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    for row in metrics:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("loss"))
        assert (row["loss/avtc"] == 0.0) == bool(row["data/image"])
    assert "mixed data: 6 clips, 4 images (50.0% of the steps)" in proc.stderr


def test_evaluate_a_checkpoint_on_a_captioned_manifest(captioned, manifest_run, tmp_path):
    """The manifest run's checkpoint (written at pp 2) evaluated at tp 2 on the manifest's six
    good clips (the broken one removed): whole clips, every caption, three score sets in the
    table and the JSON."""
    _, run_dir = manifest_run
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in captioned.read_text().splitlines()
                            if "broken" not in line))
    evaluate = subprocess.run(
        [*torchrun(2), "-m", "launch.evaluate", "configs/stage2_tiny.yaml",
         str(run_dir / "checkpoints"), "parallel.tp=2", "parallel.pp=1", "data.source=manifest",
         f"data.manifest={good}", "data.captions=[caption,captions]", "data.workers=0",
         f"run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert set(result) == {f"{s}/{d}_{k}" for s in ("sim", "dsl", "match") for d in ("t2v", "v2t")
                           for k in ("r1", "r5", "r10", "r_mean")} | {
        f"{s}/r_mean" for s in ("sim", "dsl", "match")}
    assert result["sim/t2v_r10"] == 100.0  # 6 clips: every caption's clip is in the top 10
    assert "retrieval over 6 clips" in evaluate.stderr
