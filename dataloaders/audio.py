"""A clip's audio for the audio encoder: PyAV decode to 16 kHz mono, then BEATs' log-mel filterbank.

BEATs (the stage-2 audio encoder) takes Kaldi-style filterbanks of the waveform scaled to 16-bit
range: 25 ms frames every 10 ms without padding ("snip edges"), DC offset removed, pre-emphasis
0.97, Povey window, 512-point power spectrum, 128 triangular mel bins (Kaldi's mel scale,
1127 ln(1 + f / 700), 20 Hz to Nyquist), natural log floored at float32's epsilon; then
``(fbank - 15.41663) / (2 * 6.55582)``, BEATs' dataset statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME, HOP, NFFT = 400, 160, 512  # 25 ms, 10 ms, power of two above the frame
MEL_BINS = 128
BEATS_MEAN, BEATS_STD = 15.41663, 6.55582
LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def mel(freq: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


@functools.cache
def mel_banks(bins: int = MEL_BINS, low: float = 20.0) -> torch.Tensor:
    """[bins, NFFT // 2 + 1] triangles equally spaced in mel between ``low`` and Nyquist."""
    edges = torch.linspace(float(mel(low)), float(mel(SAMPLE_RATE / 2)), bins + 2,
                           dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # the FFT bins below Nyquist; the Nyquist bin gets no weight, as in Kaldi
    fft_mel = mel(torch.arange(NFFT // 2) * SAMPLE_RATE / NFFT)[None, :]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).float()


@functools.cache
def povey_window() -> torch.Tensor:
    n = torch.arange(FRAME, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (FRAME - 1))).pow(0.85).float()


def log_mel(waveform: torch.Tensor, bins: int = MEL_BINS) -> torch.Tensor:
    """[samples] at 16 kHz (16-bit range) -> [frames, bins] log filterbank energies."""
    if waveform.numel() < FRAME:
        return torch.empty(0, bins)
    frames = waveform.float().unfold(0, FRAME, HOP)  # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - 0.97 * previous) * povey_window()
    power = torch.fft.rfft(frames, n=NFFT).abs().pow(2)  # [T, 257]
    return (power @ mel_banks(bins).T).clamp(min=LOG_FLOOR).log()


def beats_fbank(waveform: torch.Tensor, bins: int = MEL_BINS) -> torch.Tensor:
    """[samples] in [-1, 1] at 16 kHz -> [frames, bins] normalised as BEATs was trained
    (InternVideo2's stage 2 uses 64 bins)."""
    return (log_mel(waveform * 2**15, bins) - BEATS_MEAN) / (2 * BEATS_STD)


def fit_frames(fbank: torch.Tensor, frames: int) -> torch.Tensor:
    """Cut or zero-pad a filterbank [T, bins] to ``frames`` rows (as the official loader pads)."""
    if fbank.shape[0] >= frames:
        return fbank[:frames]
    return torch.cat([fbank, fbank.new_zeros(frames - fbank.shape[0], fbank.shape[1])])


def read_audio(path: str | Path, start: float, seconds: float) -> torch.Tensor | None:
    """``seconds`` of the first audio stream from ``start`` (in seconds), mono at 16 kHz, as a
    float tensor in [-1, 1]; None when the file has no audio stream. Shorter when the audio ends
    sooner."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        chunks, first, count = [], None, 0
        for frame in container.decode(stream):
            if first is None:
                first = float(frame.pts * stream.time_base) if frame.pts is not None else 0.0
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                count += len(chunks[-1])
            if first + count / SAMPLE_RATE >= start + seconds:
                break
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    skip = max(int(round((start - (first or 0.0)) * SAMPLE_RATE)), 0)
    return torch.from_numpy(samples[skip: skip + int(round(seconds * SAMPLE_RATE))].copy())


@dataclass(frozen=True)
class AudioSpec:
    """What the audio encoder takes per clip: ``seconds`` of audio as a [frames, bins]
    filterbank (cut or zero-padded)."""

    seconds: float
    bins: int
    frames: int


def clip_fbank(path: str | Path, start: float, spec: AudioSpec) -> tuple[torch.Tensor, str | None]:
    """The filterbank of ``spec.seconds`` of a clip's audio from ``start``, and None; or zeros
    and the reason when the clip has no audio or its audio does not decode (the clip is kept,
    its audio masked)."""
    empty = torch.zeros(spec.frames, spec.bins)
    try:
        wave = read_audio(path, start, spec.seconds)
    except (av.FFmpegError, OSError, ValueError) as e:
        return empty, f"audio does not decode ({type(e).__name__}: {e})"
    if wave is None or wave.numel() < FRAME:
        return empty, "no audio"
    return fit_frames(beats_fbank(wave, spec.bins), spec.frames), None
