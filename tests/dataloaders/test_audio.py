"""A clip's audio: PyAV decode to 16 kHz mono and BEATs' Kaldi-style log-mel filterbank."""

from __future__ import annotations

import math

import pytest
import torch

from dataloaders.audio import (
    BEATS_MEAN,
    BEATS_STD,
    LOG_FLOOR,
    MEL_BINS,
    SAMPLE_RATE,
    beats_fbank,
    log_mel,
    mel,
    mel_banks,
    read_audio,
)
from dataloaders.clips import write_clip


def _sine(freq: float, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (0.5 * torch.sin(2 * math.pi * freq * t)).float()


def _nearest_bin(freq: float) -> int:
    """The mel bin whose triangle's peak is nearest ``freq`` (Kaldi: equal steps in mel)."""
    low, high = float(mel(20.0)), float(mel(SAMPLE_RATE / 2))
    centres = low + (torch.arange(MEL_BINS) + 1) * (high - low) / (MEL_BINS + 1)
    return int((centres - float(mel(freq))).abs().argmin())


def test_mel_banks_are_kaldis_triangles():
    banks = mel_banks()
    assert banks.shape == (MEL_BINS, 257)
    assert float(banks.min()) == 0.0 and float(banks.max()) <= 1.0
    assert float(banks[:, -1].abs().sum()) == 0.0  # no weight on the Nyquist bin
    assert float(banks[:, 0].abs().sum()) == 0.0  # 0 Hz is below the 20 Hz edge
    # 128 bins on a 512-point FFT: bin 3 (~62-94 Hz) falls between two FFT bins and stays empty
    # (its energy is the log floor), as with Kaldi's and torchaudio's fbank
    assert torch.nonzero(banks.sum(dim=1) == 0).flatten().tolist() == [3]
    peaks = banks.argmax(dim=1)
    assert bool((peaks[4:].diff() >= 0).all())  # the triangles climb with frequency


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3500.0])
def test_a_sine_lights_the_mel_bin_at_its_frequency(freq):
    fbank = log_mel(_sine(freq) * 2**15)
    assert fbank.shape == (1 + (SAMPLE_RATE - 400) // 160, MEL_BINS)  # 25 ms / 10 ms, snip edges
    assert abs(int(fbank.mean(dim=0).argmax()) - _nearest_bin(freq)) <= 1


def test_silence_is_the_log_floor_and_beats_normalisation():
    fbank = log_mel(torch.zeros(SAMPLE_RATE))
    assert torch.allclose(fbank, torch.full_like(fbank, math.log(LOG_FLOOR)))
    normalised = beats_fbank(torch.zeros(SAMPLE_RATE))
    assert torch.allclose(normalised, (fbank - BEATS_MEAN) / (2 * BEATS_STD))
    assert log_mel(torch.zeros(399)).shape == (0, MEL_BINS)  # shorter than one frame


@pytest.mark.parametrize("codec", ["h264", "vp9"])  # AAC and Opus tracks at 48 kHz
def test_read_audio_decodes_a_window_at_16khz_mono(tmp_path, codec):
    clip = write_clip(tmp_path / "tone", codec, frames=50, fps=25, audio=True, tone=1000.0)
    whole = read_audio(clip, 0.0, 2.0)
    part = read_audio(clip, 0.5, 1.0)
    assert whole.shape == (2 * SAMPLE_RATE,) and part.shape == (SAMPLE_RATE,)
    assert 0.45 < float(part.abs().max()) < 0.55  # the 0.5-amplitude sine, resampled
    # the window from a seek is the same sound as the window cut from a whole decode
    same = beats_fbank(part) - beats_fbank(whole[SAMPLE_RATE // 2: SAMPLE_RATE * 3 // 2])
    assert float(same.abs().mean()) < 0.05
    assert abs(int(beats_fbank(part).mean(dim=0).argmax()) - _nearest_bin(1000.0)) <= 1
    # past the end: what there is
    assert read_audio(clip, 1.5, 1.0).shape[0] < 0.6 * SAMPLE_RATE


def test_a_clip_without_audio_gives_none(tmp_path):
    assert read_audio(write_clip(tmp_path / "silent", "vp9", frames=5), 0.0, 1.0) is None
