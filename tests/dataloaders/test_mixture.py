"""The media mixture (stage 2's images, stage 3's images and text): which steps train on what,
each medium read in order, still images in manifests."""

from __future__ import annotations

import json

import pytest
import torch

from dataloaders.clips import read_index, write_image
from dataloaders.manifest import Manifest, build_manifest
from dataloaders.mixture import IMAGE, NO_IMAGES, TEXT, VIDEO, Mixture, proportional
from dataloaders.pyav_decode import read_frames
from megavideo.config import ViTConfig
from megavideo.models.embedding import VideoEmbedding, frame_mean, sincos_3d


def test_the_share_of_image_steps_and_their_order():
    mixture = Mixture(0.25, seed=7, steps=4000)
    images = [s for s in range(4000) if mixture.is_image(s)]
    assert len(images) / 4000 == pytest.approx(0.25, abs=0.02)
    # each medium's steps read its data in order, without holes
    assert [mixture.ordinal(s) for s in images] == list(range(len(images)))
    videos = [s for s in range(4000) if not mixture.is_image(s)]
    assert [mixture.ordinal(s) for s in videos] == list(range(len(videos)))
    again = Mixture(0.25, seed=7, steps=100)  # the draw depends on (seed, step) alone
    assert [again.is_image(s) for s in range(100)] == [mixture.is_image(s) for s in range(100)]
    assert [Mixture(0.25, seed=8, steps=100).is_image(s) for s in range(100)] != \
        [again.is_image(s) for s in range(100)]
    assert not any(NO_IMAGES.is_image(s) for s in range(100))
    assert NO_IMAGES.ordinal(41) == 41
    assert proportional(images=1, clips=3) == 0.25 and proportional(0, 0) == 0.0


def test_three_media_each_in_its_share_and_read_in_order():
    mixture = Mixture(0.2, seed=3, steps=5000, text=0.3)
    steps = {m: [s for s in range(5000) if mixture.medium(s) == m] for m in (IMAGE, TEXT, VIDEO)}
    assert len(steps[IMAGE]) / 5000 == pytest.approx(0.2, abs=0.02)
    assert len(steps[TEXT]) / 5000 == pytest.approx(0.3, abs=0.02)
    for medium, ours in steps.items():
        assert [mixture.ordinal(s) for s in ours] == list(range(len(ours))), medium
    # the image steps are those of the two-medium mixture with the same seed and share
    two = Mixture(0.2, seed=3, steps=5000)
    assert steps[IMAGE] == [s for s in range(5000) if two.is_image(s)]
    with pytest.raises(ValueError, match="add up to more than 1"):
        Mixture(0.6, seed=0, steps=10, text=0.5)


def test_an_image_position_table():
    vit = ViTConfig(hidden_size=16, num_heads=2, num_layers=1, mlp_hidden_size=32, patch_size=8,
                    image_size=16, num_frames=4)
    mean = VideoEmbedding(vit, torch.float32, "mean")
    assert torch.equal(mean.image_pos_embed(), frame_mean(mean.pos_embed, 4, True))
    assert torch.allclose(mean.image_pos_embed()[1:],
                          mean.pos_embed[1:].reshape(4, 4, 16).mean(0))
    own = VideoEmbedding(vit, torch.float32, "own")
    assert torch.equal(own.image_pos_embed(), sincos_3d(16, 2, 1, True))
    image = torch.randn(2, 3, 1, 16, 16)
    assert own(image).shape == (2, 1 + 4, 16) and own(torch.randn(2, 3, 4, 16, 16)).shape == (
        2, 1 + 16, 16)


def test_still_images_in_a_manifest_from_official_image_rows(tmp_path):
    rows = []
    for i, kind in enumerate(("png", "jpeg")):
        path = write_image(tmp_path / f"image{i}", kind, index=3 + i, width=64, height=48)
        rows.append({"image": path.name, "caption": f"picture {i}"})
    (tmp_path / "images.json").write_text(json.dumps(rows))
    built = build_manifest(tmp_path / "images.json", tmp_path / "images.jsonl", root=tmp_path,
                           workers=1, progress=False)
    assert built.rejected == 0
    manifest = Manifest(tmp_path / "images.jsonl")
    assert len(manifest) == 2 and manifest.captions(1, ["caption"]) == ["picture 1"]
    lines = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert [(r["num_frames"], r["seek"], r["codec"]) for r in lines] == [
        (1, False, "png"), (1, False, "mjpeg")]
    for row, index in ((0, 3), (1, 4)):
        (rgb,) = read_frames(manifest.path(row), [0], seek=False)
        assert rgb.shape == (48, 64, 3) and read_index(rgb) == index
