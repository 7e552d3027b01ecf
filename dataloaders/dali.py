"""NVIDIA DALI decoding: ``fn.decoders.video`` on the sampled frames, then crop, resize and flip
in the same pipeline, to 8-bit clips (the training step normalises them on its device); 'mixed'
(NVDEC, everything on the GPU) on GPU ranks, 'cpu' where the codec allows it (VP8, VP9, MJPEG).

Facts this is built on (../shared/FIELD_NOTES.md and measured with DALI 2.4): frame counts come
from the manifest; ``pad_mode='none'`` so a frame past a truncated end is an error, not a black
frame; an error in ``run()`` leaves the pipeline unusable, so it is rebuilt (a few ms on the CPU),
and the failing samples are found by decoding them one by one.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dataloaders.sampling import Draw

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
MIN_VERSION = "2.0"  # the first release whose fn.decoders.video takes frames= and pad_mode=
# (operator schema, its path under nvidia.dali.fn) of the decoders this module can use, best first:
# fn.decoders.video (DALI 2.0 on), fn.experimental.decoders.video (DALI 1.48 to 1.53 take the two
# arguments there)
DECODERS = (("decoders__Video", ("decoders", "video")),
            ("experimental__decoders__Video", ("experimental", "decoders", "video")))


@functools.cache
def video_decoder() -> tuple[tuple[str, ...] | None, str]:
    """(the ``nvidia.dali.fn`` path of a video decoder taking ``frames=`` and ``pad_mode=``, or
    None with the reason), read from DALI's operator schemas: the import alone does not say."""
    try:
        import nvidia.dali
        from nvidia.dali import backend
    except ImportError as e:
        return None, f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda120"
    lookup = getattr(backend, "TryGetSchema", None)
    for schema, path in DECODERS:
        found = lookup(schema) if lookup is not None else None
        if found is not None and found.HasArgument("frames") and found.HasArgument("pad_mode"):
            return path, ""
    return None, (f"NVIDIA DALI {nvidia.dali.__version__} has no video decoder taking frames= "
                  f"and pad_mode= (fn.decoders.video has them from DALI {MIN_VERSION} on); "
                  "upgrade it: pip install -U nvidia-dali-cuda120")


def missing() -> str | None:
    """Why DALI cannot decode here, or None when it can."""
    return video_decoder()[1] or None


def summary() -> str:
    """The DALI release and decoder operator that run (where :func:`missing` says none is
    missing), for the log."""
    import nvidia.dali

    return f"DALI {nvidia.dali.__version__} (fn.{'.'.join(video_decoder()[0])})"


def _pipeline(device: str, size: int, batch_size: int, threads: int, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def video_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        decode = functools.reduce(getattr, video_decoder()[0], fn)
        video = decode(encoded, device=device, frames=frames, pad_mode="none")
        video = fn.resize(video, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                          interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(video, mirror=mirror, dtype=types.UINT8,
                                        output_layout="CFHW")  # normalised on the device

    pipe = video_pipeline()
    pipe.build()
    return pipe


class DaliDecoder:
    """Batches of (file bytes, draw) to uint8 clips [B, 3, T, size, size] on the pipeline's
    device."""

    def __init__(self, size: int, batch_size: int, threads: int = 2,
                 device_id: int | None = None) -> None:
        self.args = ("mixed" if device_id is not None else "cpu", size, batch_size,
                     max(threads, 1), device_id)
        self.device_id = device_id
        self.pipe = _pipeline(*self.args)

    @property
    def name(self) -> str:
        return "DALI mixed (NVDEC)" if self.device_id is not None else "DALI CPU"

    def _feed(self, encoded: list[np.ndarray], draws: list[Draw]) -> None:
        crops = [d.crop for d in draws]
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("frames", [np.asarray(d.frames, np.int32) for d in draws])
        self.pipe.feed_input("roi_start", [np.array([c.top, c.left], np.float32) for c in crops])
        self.pipe.feed_input("roi_end", [np.array([c.top + c.height, c.left + c.width],
                                                  np.float32) for c in crops])
        self.pipe.feed_input("mirror", [np.array(int(c.flip), np.int32) for c in crops])

    def _run(self, encoded: list[np.ndarray], draws: list[Draw]) -> torch.Tensor:
        self._feed(encoded, draws)
        try:
            (out,) = self.pipe.run()
        except RuntimeError:
            self.pipe = _pipeline(*self.args)  # an error leaves the pipeline unusable
            raise
        tensor = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(tensor.shape(), dtype=torch.uint8,
                             device=torch.device("cuda", self.device_id))
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device_id))
        return result

    def decode(self, encoded: list[np.ndarray], draws: list[Draw]
               ) -> tuple[torch.Tensor | None, dict[int, str]]:
        """The batch's clips, or (None, {index: reason}) naming every sample that fails."""
        try:
            return self._run(encoded, draws), {}
        except RuntimeError:
            pass
        failed = {}
        for i, (data, draw) in enumerate(zip(encoded, draws, strict=True)):
            try:
                self._run([data], [draw])
            except RuntimeError as e:
                failed[i] = _reason(e)
        if not failed:  # the batch failed as a whole only: say so rather than loop
            failed = dict.fromkeys(range(len(draws)), "DALI failed on the batch")
        return None, failed


def _reason(error: RuntimeError) -> str:
    """The operator's own sentence from DALI's long error text."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else "DALI decode error"


__all__ = ["CPU_CODECS", "DECODERS", "MIN_VERSION", "DaliDecoder", "missing", "summary",
           "video_decoder"]
