"""One device's throughput on the blocks that dominate stage 1 (``python -m launch.bench_gpu``).

The student's block stack at full width on the stage-1 sequence (CLS + the visible patches of
each frame, padded as the precision needs), forward and backward, in bf16 and in FP8 (Transformer
Engine on its spec, torchao's float8 on the local spec) where the device runs FP8; and the two
frozen teachers' block stacks, forward only, on what they see (the CLIP teacher each frame as an
image, the MAE teacher the whole clip). Each case runs ``warmup`` untimed steps, then ``steps``
timed ones (CUDA events on a GPU, the wall clock on the CPU), and reports model TFLOP/s (the
matmuls of the real tokens and heads, :mod:`megavideo.accounting.flops`), MFU against the device's
peak for the precision, the attention kernel and the peak memory; :func:`calibration` turns the
bf16 student's case into the planner's constants.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from kernels.attention import attention_kernel
from kernels.backends import layer_backend
from megavideo.accounting.devices import DeviceSpec, peak_tflops
from megavideo.accounting.elementwise import BlockShape, vit_layer_elementwise_bytes
from megavideo.accounting.flops import teacher_input, vit_layer_flops
from megavideo.accounting.planner import Calibration
from megavideo.config import Config, ConfigError, ViTConfig, validate_device
from megavideo.config.megatron import fp8_backend, fusions
from megavideo.models.embedding import Tokens
from megavideo.models.specs import transformer_config
from megavideo.models.vit import block_stack
from parallel.distributed import device as rank_device


@dataclasses.dataclass
class Case:
    """One measured configuration (a row of the table)."""

    name: str
    precision: str
    tokens: int  # real tokens per sample (the sequence is padded to ``length``)
    length: int
    batch: int
    layers: int
    seconds: float  # per step, the mean over the timed steps
    tflops: float  # model TFLOP/s
    mfu: float | None  # against the device's peak for the precision; None without a peak
    attention: str
    fp8_backend: str
    peak_gib: float | None  # None on the CPU

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fp8_runs_here(cfg: Config) -> str:
    """Why FP8 cannot be measured on this device (the sentence ``validate_device`` refuses a
    ``train.precision=fp8`` run with), or '' when it can."""
    try:
        validate_device(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                           precision="fp8")))
    except ConfigError as err:
        return str(err)
    return ""


def _timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per ``step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) / steps


def _stack_case(cfg: Config, name: str, vit: ViTConfig, precision: str, tokens: Tokens,
                batch: int, layers: int, train: bool, warmup: int, steps: int) -> Case:
    device = rank_device()
    settings = dataclasses.replace(cfg.train, precision=precision, recompute="none")
    parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=1, sp=False, pipeline_layout=[],
                                   encoder_tp=0)
    vit = dataclasses.replace(vit, num_layers=layers, drop_path=0.0)
    config = transformer_config(vit, parallel, settings, pipelined=False, sequence_parallel=False)
    padded = tokens.length > tokens.real
    stack = block_stack(vit, config, layers, padded=padded).to(device).train(train)
    x = torch.randn(tokens.length, batch, vit.hidden_size, dtype=config.params_dtype,
                    device=device, requires_grad=train)
    mask = tokens.attention_mask(batch, device)
    grad = torch.randn_like(x)

    def step() -> None:
        if train:
            out, _ = stack(x, mask, None)
            out.backward(grad)
        else:
            with torch.no_grad():
                stack(x, mask, None)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, warmup, steps)
    forward, backward = vit_layer_flops(vit, tokens.real)
    flops = layers * batch * (forward + (backward if train else 0.0))
    tflops = flops / seconds / 1e12
    peak = peak_tflops(cfg.profile.device, precision, cfg.profile.peak_tflops)
    return Case(name=name, precision=precision, tokens=tokens.real, length=tokens.length,
                batch=batch, layers=layers, seconds=seconds, tflops=tflops,
                mfu=tflops / peak if peak else None,
                attention="te" if layer_backend() == "te" else
                attention_kernel(config.attention_backend),
                fp8_backend=fp8_backend(settings),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available() else None)


def bench(cfg: Config, layers: int, warmup: int, steps: int) -> tuple[list[Case], str]:
    """Every case at ``layers`` blocks (call inside a one-rank process group); returns the cases
    and why FP8 was not measured ('' when it was)."""
    model, b = cfg.model, cfg.train.micro_batch
    no_fp8 = fp8_runs_here(cfg)
    cases = []
    for precision in ("bf16", "fp8"):
        if precision == "fp8" and no_fp8:
            continue
        tokens = Tokens.of(model, 1, False, precision == "fp8")
        cases.append(_stack_case(cfg, "student fwd+bwd", model.student, precision, tokens, b,
                                 layers, True, warmup, steps))
    clip, mae = model.clip_teacher, model.mae_teacher
    images, per_frame = teacher_input(clip)
    cases.append(_stack_case(cfg, "CLIP teacher fwd", clip, "bf16",
                             Tokens(per_frame, per_frame), b * images,
                             min(layers, clip.num_layers), False, warmup, steps))
    _, mae_tokens = teacher_input(mae)
    cases.append(_stack_case(cfg, "MAE teacher fwd", mae, "bf16", Tokens(mae_tokens, mae_tokens),
                             b, min(layers, mae.num_layers), False, warmup, steps))
    return cases, no_fp8


def calibration(cfg: Config, cases: list[Case], device: DeviceSpec) -> Calibration | None:
    """The planner's constants from the bf16 student case on ``device``: its matmul efficiency
    is the case's model FLOP/s over the peak once the block stack's element-wise work (at the
    planner's HBM efficiency, :mod:`megavideo.accounting.elementwise`) is taken out of its time;
    None without a peak (the CPU)."""
    student = next(c for c in cases if c.precision == "bf16" and c.name.startswith("student"))
    if student.mfu is None:
        return None
    vit, fused = cfg.model.student, fusions(cfg.train)
    shape = BlockShape(vit.hidden_size, vit.num_heads, vit.mlp_hidden_size, student.length,
                       student.batch)
    elementwise = student.layers * vit_layer_elementwise_bytes(
        shape, attention=student.attention, qk_norm=vit.qk_norm,
        layer_scale=bool(vit.layer_scale_init), drop_path=False,
        fused_residual="residual" in fused, fused_qk_norm="qk_norm" in fused)
    defaults = Calibration()
    seconds = elementwise / (device.hbm_gbps * 1e9 * defaults.hbm_efficiency)
    matmul = student.seconds - seconds if seconds < student.seconds else student.seconds
    return dataclasses.replace(defaults, matmul_efficiency=round(
        student.mfu * student.seconds / matmul, 4), source=f"launch.bench_gpu on {device.name}")


__all__ = ["Case", "bench", "calibration", "fp8_runs_here"]
