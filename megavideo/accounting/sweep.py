"""``launch.profile``'s sweep: a few steps of each layout on this machine, measured against the
planner's prediction, and the calibration file the planner reads.

Every rank runs every layout (a layout is a list of dotted overrides on the run config); the
Trainer of each is built in the same process group, with ``profile.comm`` and
``profile.pipeline`` on. The first step of a layout warms up and is dropped; the others' medians are
kept. The calibration's ``matmul_efficiency`` is fitted on the layouts of the first micro-batch size
only, so the other micro-batch sizes test the planner's prediction rather than the fit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch.distributed as dist

from megavideo.accounting.activations import student_layer_bytes
from megavideo.accounting.devices import (
    DeviceSpec,
    bus_bandwidth,
    local_device,
    measure_copy_gbps,
    measure_matmul_tflops,
)
from megavideo.accounting.planner import Calibration, Layout, Planner
from megavideo.config import Config, ConfigError, load_config, validate_world
from megavideo.training.loop import Trainer

log = logging.getLogger(__name__)

PROFILE_OVERRIDES = ["profile.comm=true", "profile.pipeline=true", "run.tensorboard=false",
                     "train.warmup_steps=0",
                     "checkpoint.save_at_end=false", "data.source=synthetic"]


@dataclass
class Measured:
    overrides: list[str]
    layout: Layout
    metrics: dict[str, float]  # medians over the measured steps
    predicted_step_s: float = 0.0
    predicted_memory_gib: float = 0.0


def default_sweep(cfg: Config, world: int) -> list[list[str]]:
    """tp x pp pairs that use the ``world`` ranks (sp with tp > 1), at the config's micro-batch and
    twice it."""
    out = []
    for mb in (cfg.train.micro_batch, 2 * cfg.train.micro_batch):
        for tp in (t for t in range(1, world + 1) if world % t == 0):
            for pp in (p for p in range(1, world // tp + 1) if world // tp % p == 0):
                out.append([f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.vpp=1",
                            f"parallel.sp={str(tp > 1).lower()}", f"train.micro_batch={mb}"])
    return out


def machine(world: int) -> DeviceSpec:
    """This machine as the planner sees it: the table's GPU, or for a CPU run a spec measured
    here (every rank's matmul rate, the world's all-reduce bandwidth, the memory per rank)."""
    found = local_device()
    if found is not None:
        return found
    flops = measure_matmul_tflops()
    bandwidth = bus_bandwidth() / 1e9
    memory = psutil.virtual_memory().total / 2**30 / world
    return DeviceSpec("this CPU", flops, flops, flops, memory, bandwidth, bandwidth,
                      measure_copy_gbps(), gpus_per_node=world)


def run_layout(config: str, base: list[str], layout: list[str], steps: int) -> Measured | None:
    """The median metrics of ``layout`` (overrides on top of ``base``) over ``steps`` - 1 steps
    after one warm-up (None when the layout is invalid for this world; every rank agrees since
    they check the same config)."""
    try:
        cfg = load_config(config, base + layout + PROFILE_OVERRIDES + [f"train.steps={steps}"])
        validate_world(cfg, dist.get_world_size())
    except ConfigError as err:
        log.warning("skipped %s: %s", " ".join(layout), err)
        return None
    trainer = Trainer(cfg)
    trainer.start_data(0, {}, None)
    rows = [trainer.train_step(step) for step in range(steps)][1:]
    metrics = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return Measured(layout, Layout.of(cfg, dist.get_world_size()),
                    metrics | student_layer_bytes(cfg))


def fit(measured: list[Measured], planner: Planner) -> Calibration:
    """The planner's constants from the measured steps of the first micro-batch size:
    ``matmul_efficiency`` from the layouts without TP or PP (compute alone, less the element-wise
    work at the measured copy bandwidth), then ``latency_s`` (the fixed cost of a collective or
    transfer) from the others; the measured machine's bandwidths are taken as they are
    (efficiency 1)."""
    first = [m for m in measured if m.layout.micro_batch == measured[0].layout.micro_batch]
    alone = [m for m in first if m.layout.tp == m.layout.pp == 1] or first
    ideal = Calibration(1.0, 1.0, 1.0, 0.0, 0.0, hbm_efficiency=1.0)
    ratios = []
    for m in alone:
        predicted = planner.with_calibration(ideal).predict(m.layout)
        elementwise = predicted.time_s["elementwise"]  # at the measured copy bandwidth
        compute = predicted.time_s["compute_and_tp"] - predicted.time_s["tp"] - elementwise
        rest = predicted.step_s - compute  # the element-wise work, the data-parallel reduction
        ratios.append(compute / max(m.metrics["perf/step_s"] - rest, 1e-9))
    efficiency = statistics.median(ratios)
    base = Calibration(efficiency, 1.0, 1.0, 0.0, 0.0, hbm_efficiency=1.0)
    latencies = []
    for m in (m for m in first if m not in alone):
        zero = planner.with_calibration(base).predict(m.layout).step_s
        per_second = planner.with_calibration(replace(base, latency_s=1.0)).predict(
            m.layout).step_s - zero
        if per_second > 0:
            latencies.append(max(0.0, (m.metrics["perf/step_s"] - zero) / per_second))
    return replace(base, latency_s=statistics.median(latencies) if latencies else 0.0,
                   source=f"launch.profile: {len(first)} layouts at micro-batch "
                          f"{first[0].layout.micro_batch}")


def report(out: Path, device: DeviceSpec, calibration: Calibration,
           measured: list[Measured]) -> None:
    """report.json, calibration.json and the PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    calibration.save(out / "calibration.json")
    rows = [{"overrides": m.overrides, "layout": dataclasses.asdict(m.layout), **m.metrics,
             "predicted_step_s": m.predicted_step_s,
             "predicted_memory_gib": m.predicted_memory_gib} for m in measured]
    (out / "report.json").write_text(json.dumps({
        "device": dataclasses.asdict(device), "calibration": dataclasses.asdict(calibration),
        "layouts": rows}, indent=1) + "\n")
    _plots(out, measured)


def _label(layout: Layout) -> str:
    return (f"tp{layout.tp} pp{layout.pp}{' sp' if layout.sp else ''} "
            f"dp{layout.dp} mb{layout.micro_batch}")


def _plots(out: Path, measured: list[Measured]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(m.layout) for m in measured]
    for name, key, unit in (("throughput", "samples_per_s", "samples/s"),
                            ("memory", "mem/peak_gib", "peak GiB (largest rank)")):
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
        ax.bar(labels, [m.metrics[key] for m in measured])
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=45)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    got = [m.metrics["perf/step_s"] for m in measured]
    want = [m.predicted_step_s for m in measured]
    ax.scatter(want, got)
    for x, y, text in zip(want, got, labels, strict=True):
        ax.annotate(text, (x, y), fontsize=7)
    top = max(got + want) * 1.1
    ax.plot([0, top], [0, top], linestyle="--", color="grey")
    ax.set_xlabel("predicted step s")
    ax.set_ylabel("measured step s")
    fig.tight_layout()
    fig.savefig(out / "predicted.png", dpi=100)
    plt.close(fig)
