"""Rank code of the parity tests: a reference at tp1/pp1 and the same step at other layouts."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megavideo.config import load_config
from megavideo.models.lora import adapter_of
from megavideo.training.loop import Trainer
from megavideo.training.state import canonical_params, full_state, load_full_state
from parallel.tensors import gather_grad_shards

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "stage1_tiny.yaml"
BASE = ["train.steps=3", "train.warmup_steps=0", "train.global_batch=8", "train.micro_batch=2",
        "run.tensorboard=false", "parallel.tp=1", "parallel.pp=1", "parallel.sp=false"]


def trainer(overrides: list[str], config: str | None = None) -> Trainer:
    return Trainer(load_config(config or CONFIG, BASE + overrides))


def reference(rank: int, world: int, out: str, steps: int, config: str | None = None,
              base: tuple[str, ...] = ()) -> None:
    tr = trainer(list(base), config)
    result = {"initial": _initial_state(tr)}
    _nonzero_adapters(tr)
    result["params"] = full_state(tr.chunks)
    if tr.stage.teachers is not None:
        result["teachers"] = full_state([tr.stage.teachers])
    result["loss"] = tr.forward_backward(step=0)
    result["grads"] = full_state(tr.chunks, grads=True)
    result["losses"] = [tr.train_step(step)["loss"] for step in range(steps)]
    result["trained"] = full_state(tr.chunks)
    torch.save(result, out)


def _initial_state(tr: Trainer) -> dict[str, torch.Tensor]:
    """The whole initial weights of this pipeline rank, the teachers' under their prefix."""
    state = full_state(tr.chunks)
    if tr.stage.teachers is not None:
        state |= {f"teachers.{k}": v for k, v in full_state([tr.stage.teachers]).items()}
    return state


def _nonzero_adapters(tr: Trainer) -> None:
    """LoRA's B starts at zero, which would leave A's gradient zero: give B values so the
    parity covers both."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in canonical_params(tr.chunks):
            if (adapter_of(name) or ("", "", ""))[2] == "b":
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


def _padding_max(tr: Trainer) -> float:
    """Largest magnitude in this rank's slices of the zero padding heads."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    worst = 0.0
    for _, param in canonical_params(tr.chunks):
        if getattr(param, "head_padding", None) is None:
            continue
        dim, rows, heads = param.head_padding
        local = param.shape[dim]
        real_here = min(max(rows * heads - tp_rank * local, 0), local)
        padding = param.detach().narrow(dim, real_here, local - real_here)
        if padding.numel():
            worst = max(worst, padding.abs().max().item())
    return worst


def layouts(rank: int, world: int, ref: str, cases: list[tuple[str, list[str], int]], out: str,
            config: str | None = None, base: tuple[str, ...] = ()) -> None:
    """For each (name, overrides, optimizer steps): load the reference weights, run the step,
    write this pipeline rank's loss terms and gradients (or parameters after the steps)."""
    reference_state = torch.load(ref)
    for name, overrides, steps in cases:
        tr = trainer(list(base) + overrides, config)
        initial = _initial_state(tr)
        load_full_state(tr.chunks, reference_state["params"])
        if tr.stage.teachers is not None:
            load_full_state([tr.stage.teachers], reference_state["teachers"])
        if steps:
            losses = [tr.train_step(step)["loss"] for step in range(steps)]
            with tr.gathered_params():  # the last step's overlapped gather, if any
                result = {"losses": losses, "trained": full_state(tr.chunks),
                          "padding_max": _padding_max(tr)}
        else:
            loss = tr.forward_backward(step=0)
            gather_grad_shards(tr.chunks)
            result = {"loss": loss, "grads": full_state(tr.chunks, grads=True)}
        result["initial"] = initial
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        if parallel_state.get_data_parallel_rank() == 0:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            torch.save(result, Path(out) / f"{name}.pp{pp_rank}.tp{tp_rank}.pt")
        dist.barrier()


def sequence(rank: int, world: int, calls: list) -> None:
    """Several (worker function, arguments) calls in one process group: one spawn per world
    size for stage 1's and stage 2's parity."""
    for fn, args in calls:
        fn(rank, world, *args)
