"""The layout planner: which (tp, pp, vpp, dp, sp, micro-batch, recomputation, distributed
optimizer) to run a model on N GPUs, ranked by predicted step time, with a memory check per rank.

Performance model of one step (every number per GPU; see docs/performance.md):

    compute    the step's hardware FLOPs (:func:`megavideo.accounting.flops.step_flops`: recomputation and
               head/token padding included) of each pipeline stage's parts at
               peak x ``matmul_efficiency``; the frozen teachers run on the first stage, the text and
               audio encoders and the heads on the last
    TP / SP    the collectives of every transformer layer (:func:`.comm_volume.tp_layer_volume`)
               at NVLink bandwidth x ``nvlink_efficiency``, not overlapped (megatron-core's local and
               TE specs run them on the compute stream)
    pipeline   1F1B over m micro-batches with per-stage times t_r: (m v - 1) max_r t_r / v + sum_r t_r / v
               (equal stages give the bubble (p - 1) / (m v + p - 1)), plus each micro-batch's
               activation send and gradient receive between stages
    DP         the fp32 gradient all-reduce (or reduce-scatter + parameter all-gather with the
               distributed optimizer), over NVLink inside a node and the network between nodes;
               overlapped as a GPU run overlaps it (:func:`megavideo.config.megatron.overlap`):
               hidden behind ~2/3 of the last micro-batch on the slowest rank (all of it with the
               overlapped parameter gather), only the rest added to the step

Memory of each pipeline rank: weights, fp32 gradients, the optimizer (fp32 master + Adam moments,
divided by dp with the distributed optimizer), frozen weights (the teachers on the first stage),
activations (:func:`.activations.vit_layer_bytes` per layer x the layers of the micro-batches
in flight: p - r in 1F1B, megatron-core's warm-up count + 1 chunks interleaved), the first stage's
teacher targets for the step's micro-batches, and ``reserve_gib`` for the CUDA context, NCCL buffers
and fragmentation. A layout whose worst rank exceeds the device memory is refused with the reason.

The constants come from a calibration file (:class:`Calibration`), which ``launch.profile`` writes
from measurements; the defaults are round numbers for a well-tuned bf16 H100 run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from megavideo.accounting.activations import vit_layer_bytes
from megavideo.accounting.comm_volume import dp_volume, ring_wire_bytes, tp_layer_volume
from megavideo.accounting.describe import bytes_per_param, local_numel, meta_models
from megavideo.accounting.devices import DEVICES, DeviceSpec
from megavideo.accounting.elementwise import BlockShape, vit_layer_elementwise_bytes
from megavideo.accounting.flops import step_flops, teacher_input
from megavideo.accounting.pipeline_timing import warmup_forwards
from megavideo.config import Config, ConfigError, validate
from megavideo.config.megatron import overlap
from megavideo.models.video import Tokens
from parallel.distributed import single_rank_world
from parallel.layout import split_layers

GiB = 2**30
FIRST_STAGE_PARTS = ("clip_teacher", "mae_teacher")
PIPELINED_PARTS = ("student", "video")


@dataclass
class Calibration:
    """The performance model's constants (a JSON file: ``launch.profile`` writes one)."""

    matmul_efficiency: float = 0.6  # achieved / peak FLOP/s of the step's matmuls
    nvlink_efficiency: float = 0.7  # achieved / nominal bandwidth inside a node
    network_efficiency: float = 0.7  # achieved / nominal bandwidth between nodes
    reserve_gib: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation
    latency_s: float = 2e-5  # fixed cost of one TP collective or pipeline transfer
    hbm_efficiency: float = 0.7  # achieved / nominal memory bandwidth of element-wise kernels
    source: str = "defaults"

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: v for k, v in data.items() if k in {f.name for f in
                                                                  dataclasses.fields(cls)}})
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"calibration file {path} is unreadable: {err}.") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    dp: int
    sp: bool
    micro_batch: int
    recompute: str
    distributed_optimizer: bool
    teacher_tp: int = 0  # stage 1: the frozen teachers' TP degree (0: tp)

    @property
    def teacher_tp_size(self) -> int:
        return self.teacher_tp or self.tp

    def overrides(self) -> list[str]:
        """The dotted overrides that put a run config on this layout."""
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}",
                f"parallel.sp={str(self.sp).lower()}", f"train.micro_batch={self.micro_batch}",
                f"train.recompute={self.recompute}",
                f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
                *([f"parallel.teacher_tp={self.teacher_tp}"] if self.teacher_tp else [])]

    @classmethod
    def of(cls, cfg: Config, gpus: int) -> Layout:
        """The layout a run config asks for on ``gpus`` GPUs (dp 0 when they do not divide)."""
        par, train = cfg.parallel, cfg.train
        model_parallel = par.tp * par.pp
        return cls(par.tp, par.pp, par.vpp, gpus // model_parallel if gpus % model_parallel == 0
                   else 0, par.sp, train.micro_batch, train.recompute, par.distributed_optimizer,
                   par.teacher_tp)

    def apply(self, cfg: Config) -> Config:
        par = replace(cfg.parallel, tp=self.tp, pp=self.pp, vpp=self.vpp, sp=self.sp,
                      distributed_optimizer=self.distributed_optimizer, pipeline_layout=[],
                      teacher_tp=self.teacher_tp)
        train = replace(cfg.train, micro_batch=self.micro_batch, recompute=self.recompute)
        return replace(cfg, parallel=par, train=train)


@dataclass
class Prediction:
    layout: Layout
    step_s: float = 0.0
    samples_per_s: float = 0.0
    tflops: float = 0.0  # model TFLOP/s per GPU
    mfu: float = 0.0
    bubble: float = 0.0
    padding: float = 0.0  # share of the hardware FLOPs spent on padding heads and tokens
    time_s: dict[str, float] = field(default_factory=dict)  # compute, tp, pp, dp
    memory_gib: dict[str, float] = field(default_factory=dict)  # the worst rank's parts
    worst_rank: int = 0
    fits: bool = True
    why: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Inventory:
    """Parameter counts per rank for any layout, from one build of the model on the meta device."""

    def __init__(self, cfg: Config) -> None:
        with single_rank_world():
            whole, teachers = meta_models(cfg)
        self.layer, self.first, self.last, self.frozen_last = [], [], [], []
        for name, param in whole.named_parameters():
            if name.startswith("blocks.layers.0."):
                self.layer.append(param)
            elif name.startswith("blocks.layers."):
                continue
            elif name.startswith("embed."):
                self.first.append(param)
            elif param.requires_grad:
                self.last.append(param)
            else:
                self.frozen_last.append(param)
        self.frozen_first = list(teachers.parameters()) if teachers is not None else []
        self._counts: dict[tuple[str, int], int] = {}

    def _count(self, part: str, tp: int) -> int:
        if (part, tp) not in self._counts:
            self._counts[part, tp] = sum(local_numel(p, tp) for p in getattr(self, part))
        return self._counts[part, tp]

    def rank(self, tp: int, layers: int, first: bool, last: bool,
             teacher_tp: int = 0) -> tuple[int, int]:
        """(trained, frozen) parameters of a pipeline rank holding ``layers`` layers (the first
        stage's frozen teachers at ``teacher_tp``, 0: ``tp``)."""
        trained = layers * self._count("layer", tp)
        frozen = 0
        if first:
            trained += self._count("first", tp)
            frozen += self._count("frozen_first", teacher_tp or tp)
        if last:
            trained += self._count("last", tp)
            frozen += self._count("frozen_last", tp)
        return trained, frozen


def pipeline_time(stage_s: list[float], microbatches: int, vpp: int = 1) -> float:
    """A step of megatron-core's 1F1B (interleaved with ``vpp`` chunks) over pipeline ranks that
    take ``stage_s`` seconds per micro-batch each: the slowest paces the steady state, every rank's
    share fills and drains the pipeline once. Equal stages give ``(v m + p - 1) t / v``, i.e. the
    bubble ``(p - 1) / (v m + p - 1)``."""
    v = vpp
    return (microbatches * v - 1) * max(stage_s) / v + sum(stage_s) / v


def tp_layer_calls(tp: int, sp: bool, qk_norm: bool, recompute: str) -> float:
    """TP collectives one block issues per micro-batch: :func:`tp_layer_volume` counts its
    activation-sized calls in units of one activation and the q/k statistics in 4-byte units."""
    calls = sum(tp_layer_volume(1, 1, 1, 1, tp, sp, False, recompute).values())
    return calls + sum(tp_layer_volume(1, 1, 0, 1, tp, sp, qk_norm, recompute).values()) / 4


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def layouts(cfg: Config, gpus: int, global_batch: int, device: DeviceSpec) -> list[Layout]:
    """Every layout of ``gpus`` GPUs worth predicting: tp within a node, pp dividing the GPUs,
    vpp splitting the layers, micro-batches dividing the per-replica batch."""
    layers = cfg.model.student.num_layers
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= device.gpus_per_node and gpus % t == 0):
        for pp in _divisors(gpus // tp, min(layers, 16)):
            dp = gpus // (tp * pp)
            vpps = [1] + ([v for v in (2, 3, 4, 6, 8) if pp * v <= layers] if pp > 1 else [])
            for vpp, mb in itertools.product(vpps, (1, 2, 4, 8, 16)):
                if global_batch % (dp * mb):
                    continue
                m = global_batch // (dp * mb)
                if vpp > 1 and m % pp:
                    continue
                for sp, recompute, dist_opt, teacher_tp in itertools.product(
                        (False, True) if tp > 1 else (False,), ("none", "selective", "full"),
                        (False, True) if dp > 1 else (False,), teacher_tps(cfg, tp)):
                    out.append(Layout(tp, pp, vpp, dp, sp, mb, recompute, dist_opt, teacher_tp))
    return out


def teacher_tps(cfg: Config, tp: int) -> list[int]:
    """The teachers' TP degrees worth predicting at ``tp``: stage 1's divisors of tp below it
    (each TP group then splits the clips over whole-teacher groups) and 0 (the student's)."""
    if cfg.stage != 1:
        return [0]
    return [t for t in _divisors(tp, tp) if t < tp] + [0]


class Planner:
    """Predicts step time and memory of layouts of one model on ``gpus`` GPUs of ``device``."""

    def __init__(self, cfg: Config, gpus: int, device: str | DeviceSpec, global_batch: int,
                 calibration: Calibration | None = None, peak_tflops: float = 0.0,
                 inventory: Inventory | None = None) -> None:
        """``inventory``: the model's, built beforehand (it needs a process group of its own, so a
        caller inside a training world builds it before starting that world)."""
        if cfg.stage == 3:
            raise ConfigError("launch.plan plans stages 1 and 2 (the pipelined video encoder); "
                              "stage 3's LLM layouts are not modelled yet.")
        if isinstance(device, str) and device not in DEVICES:
            raise ConfigError(f"unknown GPU type '{device}' (known: {', '.join(DEVICES)}).")
        self.cfg = replace(cfg, train=replace(cfg.train, global_batch=global_batch))
        self.gpus, self.global_batch = gpus, global_batch
        self.device = DEVICES[device] if isinstance(device, str) else device
        self.calibration = calibration or Calibration()
        self.peak = peak_tflops or self.device.peak_tflops(cfg.train.precision)
        self.bytes = 2 if cfg.train.bf16 else 4
        self.inventory = inventory or Inventory(self.cfg)

    def with_calibration(self, calibration: Calibration) -> Planner:
        """The same planner (same model inventory) with other constants."""
        other = copy.copy(self)
        other.calibration = calibration
        return other

    @property
    def rates(self) -> tuple[float, float]:
        """FLOP/s of (the precision's matmuls, the FP8 GEMMs) at the calibrated efficiency: under
        fp8 the rest runs in bf16, at the device's bf16 : fp8 ratio of the (overridable) peak."""
        d, efficiency = self.device, self.calibration.matmul_efficiency
        fp8 = self.cfg.train.precision == "fp8"
        base = self.peak * (d.bf16_tflops / d.fp8_tflops if fp8 else 1.0)
        return base * 1e12 * efficiency, self.peak * 1e12 * efficiency

    def candidates(self) -> list[Layout]:
        return layouts(self.cfg, self.gpus, self.global_batch, self.device)

    def predict(self, layout: Layout) -> Prediction:
        """The predicted step of ``layout`` (``fits`` False and ``why`` when it cannot run)."""
        out = Prediction(layout)
        cfg = layout.apply(self.cfg)
        try:
            validate(cfg, self.gpus)
        except ConfigError as err:
            out.fits, out.why = False, str(err)
            return out
        m = self.global_batch // (layout.dp * layout.micro_batch)
        counts = split_layers(cfg.model.student.num_layers, layout.pp, layout.vpp)
        per_rank = [sum(counts[v * layout.pp + r] for v in range(layout.vpp))
                    for r in range(layout.pp)]
        self._memory(cfg, layout, m, per_rank, out)
        self._time(cfg, layout, m, per_rank, out)
        return out

    # -- time ---------------------------------------------------------------------------------

    def _bandwidth(self, ranks_spanned: int) -> float:
        """Bytes/s per GPU of a group whose ranks span ``ranks_spanned`` consecutive GPUs."""
        c, d = self.calibration, self.device
        if ranks_spanned <= d.gpus_per_node:
            return d.nvlink_gbps * 1e9 * c.nvlink_efficiency
        return d.network_gbps * 1e9 * c.network_efficiency

    def _time(self, cfg: Config, layout: Layout, m: int, per_rank: list[int],
              out: Prediction) -> None:
        flops = step_flops(cfg, layout.dp)
        student = cfg.model.student
        layers = student.num_layers
        parts = {k: flops.forward.get(k, 0.0) + flops.backward.get(k, 0.0)
                 + flops.recompute.get(k, 0.0) for k in set(flops.forward) | set(flops.recompute)}
        piped_parts = [k for k in parts if k in PIPELINED_PARTS]
        first_parts = [k for k in parts if k in FIRST_STAGE_PARTS]
        last_parts = [k for k in parts if k not in PIPELINED_PARTS and k not in FIRST_STAGE_PARTS]
        replicas = layout.dp * m  # micro-batches of the whole step over all replicas

        def matmul_s(names: list[str], extra: float = 0.0) -> float:
            """Seconds per micro-batch and rank of these parts' matmuls: the FP8 GEMMs at the
            FP8 rate, the rest at the precision's."""
            total = sum(parts[k] for k in names) + extra
            eight = sum(flops.fp8.get(k, 0.0) for k in names)
            return ((total - eight) / self.rates[0] + eight / self.rates[1]) / replicas / layout.tp

        hbm = self.device.hbm_gbps * 1e9 * self.calibration.hbm_efficiency
        elementwise_s = self._student_elementwise(cfg, layout) / hbm
        teachers_elementwise_s = self._teachers_elementwise(cfg, layout) / hbm
        teachers_comm_s = self._teachers_comm_s(cfg, layout)
        piped_s = matmul_s(piped_parts, flops.padding) / layers
        first_s = matmul_s(first_parts) + teachers_elementwise_s + teachers_comm_s
        last_s = matmul_s(last_parts)
        tokens = Tokens.of(cfg.model, layout.tp, layout.sp, cfg.train.precision == "fp8").length
        tp_bw = self._bandwidth(layout.tp)
        tp_calls = tp_layer_calls(layout.tp, layout.sp, student.qk_norm, layout.recompute)
        tp_wire = ring_wire_bytes(tp_layer_volume(tokens, layout.micro_batch, student.hidden_size,
                                                  self.bytes, layout.tp, layout.sp, student.qk_norm,
                                                  layout.recompute), layout.tp)
        pp_bytes = tokens * layout.micro_batch * student.hidden_size * self.bytes / (
            layout.tp if layout.sp else 1)
        pp_bw = self._bandwidth(layout.tp * layout.dp * 2)
        latency = self.calibration.latency_s
        stage_s, tp_s = [], 0.0
        for r, n in enumerate(per_rank):
            work = n * (piped_s + elementwise_s)
            work += first_s if r == 0 else 0.0
            work += last_s if r == len(per_rank) - 1 else 0.0
            comm = n * (tp_wire / tp_bw + tp_calls * latency) if layout.tp > 1 else 0.0
            p2p = 2 * layout.vpp * (pp_bytes / pp_bw + latency) if layout.pp > 1 else 0.0
            stage_s.append(work + comm + p2p)
            tp_s = max(tp_s, comm * m)
        pipeline = pipeline_time(stage_s, m, layout.vpp)
        trained, _ = self.inventory.rank(layout.tp, max(per_rank), True, False)
        dp_bytes = ring_wire_bytes(dp_volume(trained, layout.dp, layout.distributed_optimizer,
                                             4, self.bytes), layout.dp)
        dp_s = dp_bytes / self._bandwidth(layout.tp * layout.dp)
        # overlapped (megatron-core's DDP on a GPU run): the bucketed reduce runs during the last
        # micro-batch's backward (~2/3 of its time), with the overlapped parameter gather also
        # during the next step's first forward; what does not fit stays exposed
        grad, param = overlap(cfg, gpu=True)
        hidden = (1.0 if param else 2 / 3) * max(stage_s) if grad else 0.0
        dp_exposed = max(0.0, dp_s - hidden)
        step = pipeline + dp_exposed
        out.step_s = step
        out.samples_per_s = self.global_batch / step
        out.tflops = flops.model / step / self.gpus / 1e12
        out.mfu = out.tflops / self.peak
        out.padding = flops.padding / flops.hardware if flops.hardware else 0.0
        out.bubble = 1.0 - m * sum(stage_s) / len(stage_s) / pipeline
        out.time_s = {"compute_and_tp": pipeline, "tp": tp_s, "dp": dp_exposed,
                      "dp_overlapped": dp_s - dp_exposed,
                      "elementwise": (elementwise_s * max(per_rank) + teachers_elementwise_s) * m,
                      "teachers_comm": teachers_comm_s * m}

    def _fused(self, cfg: Config) -> tuple[bool, bool]:
        """(residual chain, q/k norm) fused on the planned GPUs: named in train.fusions, or auto
        (a GPU's torch has Triton)."""
        names = set(cfg.train.fusions)
        auto = "auto" in names
        return auto or "residual" in names, auto or "qk_norm" in names

    def _block_elementwise(self, cfg: Config, vit, tokens: int, batch: int, tp: int, sp: bool,
                           recompute: str, trained: bool) -> float:
        residual, qk = self._fused(cfg)
        shape = BlockShape(vit.hidden_size, vit.num_heads, vit.mlp_hidden_size, tokens, batch,
                           tp, sp, recompute, self.bytes)
        return vit_layer_elementwise_bytes(
            shape, trained=trained,
            attention="unfused" if cfg.train.attention == "unfused" else "flash",
            qk_norm=vit.qk_norm, layer_scale=bool(vit.layer_scale_init),
            drop_path=trained and vit.drop_path > 0, fused_residual=residual, fused_qk_norm=qk)

    def _student_elementwise(self, cfg: Config, layout: Layout) -> float:
        """HBM bytes of one student block's element-wise work per micro-batch and rank."""
        tokens = Tokens.of(cfg.model, layout.tp, layout.sp, cfg.train.precision == "fp8").length
        return self._block_elementwise(cfg, cfg.model.student, tokens, layout.micro_batch,
                                       layout.tp, layout.sp, layout.recompute, True)

    def _teacher_shapes(self, cfg: Config, layout: Layout) -> list[tuple]:
        """Stage 1's teachers as (config, tokens, images per teacher group) per micro-batch."""
        if cfg.stage != 1:
            return []
        share = layout.micro_batch / (layout.tp // layout.teacher_tp_size)
        shapes = []
        for vit in (cfg.model.clip_teacher, cfg.model.mae_teacher):
            images, n = teacher_input(vit)
            shapes.append((vit, n, share * images))
        return shapes

    def _teachers_comm_s(self, cfg: Config, layout: Layout) -> float:
        """Seconds per micro-batch of the teachers' TP all-reduces (forward only, no SP) and of
        the replica group's gather of the targets."""
        t = layout.teacher_tp_size
        seconds = 0.0
        for vit, n, images in self._teacher_shapes(cfg, layout):
            if t > 1:
                volume = tp_layer_volume(n, images, vit.hidden_size, self.bytes, t, False,
                                         vit.qk_norm, backward=False)
                calls = 2 + (2 if vit.qk_norm else 0)
                seconds += vit.num_layers * (ring_wire_bytes(volume, t) / self._bandwidth(t)
                                             + calls * self.calibration.latency_s)
        replicas = layout.tp // t
        if replicas > 1:
            gathered = self._targets(cfg, 1, layout)  # one micro-batch's targets
            seconds += (ring_wire_bytes({"all_gather": gathered}, replicas)
                        / self._bandwidth(layout.tp) + self.calibration.latency_s)
        return seconds

    def _teachers_elementwise(self, cfg: Config, layout: Layout) -> float:
        """HBM bytes of the teachers' element-wise work per micro-batch and rank (forward)."""
        return sum(vit.num_layers * self._block_elementwise(
            cfg, vit, n, images, layout.teacher_tp_size, False, "none", False)
            for vit, n, images in self._teacher_shapes(cfg, layout))

    # -- memory -------------------------------------------------------------------------------

    @staticmethod
    def _in_flight(layout: Layout, rank: int, m: int) -> int:
        """Micro-batch chunks whose activations rank ``rank`` holds at its peak (megatron-core's
        warm-up count + 1)."""
        total = m * layout.vpp
        return min(warmup_forwards(rank, layout.pp, layout.vpp, total) + 1, total)

    def _memory(self, cfg: Config, layout: Layout, m: int, per_rank: list[int],
                out: Prediction) -> None:
        student, model = cfg.model.student, cfg.model
        tokens = Tokens.of(model, layout.tp, layout.sp, cfg.train.precision == "fp8").length
        per_layer = vit_layer_bytes(
            student.hidden_size, student.num_heads,
            student.mlp_hidden_size, tokens, layout.micro_batch, layout.tp, layout.sp,
            layout.recompute, self.bytes,
            attention="unfused" if cfg.train.attention == "unfused" else "flash",
            qk_norm=student.qk_norm,
            layer_scale=bool(student.layer_scale_init))
        per_param = bytes_per_param(cfg.train.precision, layout.distributed_optimizer, layout.dp)
        worst, worst_total = {}, -1.0
        for r, n in enumerate(per_rank):
            first, last = r == 0, r == layout.pp - 1
            trained, frozen = self.inventory.rank(layout.tp, n, first, last, layout.teacher_tp)
            parts = {
                **{part: trained * n_bytes for part, n_bytes in per_param.items()},
                "frozen": frozen * per_param["weights"],
                "activations": per_layer * n / layout.vpp * self._in_flight(layout, r, m),
                "targets": self._targets(cfg, m, layout) if first and cfg.stage == 1 else 0.0,
            }
            parts = {k: v / GiB for k, v in parts.items()}
            parts["reserve"] = self.calibration.reserve_gib
            total = sum(parts.values())
            if total > worst_total:
                worst, worst_total, out.worst_rank = parts, total, r
        out.memory_gib = worst | {"total": worst_total}
        if worst_total > self.device.memory_gib:
            shown = ", ".join(f"{k} {v:.1f}" for k, v in worst.items() if v >= 0.05)
            out.fits = False
            out.why = (f"pipeline rank {out.worst_rank} needs {worst_total:.1f} GiB ({shown}) of "
                       f"the {self.device.name}'s {self.device.memory_gib:g} GiB")

    def _targets(self, cfg: Config, m: int, layout: Layout) -> float:
        """Bytes of the stage-1 teacher targets (and the student's frames) the first stage builds
        for all of a step's micro-batches before the schedule starts."""
        model, student = cfg.model, cfg.model.student
        visible = Tokens.of(model, 1, False).real
        per_sample = (model.clip_layers * visible * model.clip_teacher.hidden_size
                      + model.mae_layers * (visible - 1) * model.mae_teacher.hidden_size
                      + model.clip_teacher.pool_dim
                      + 3 * student.num_frames * student.image_size ** 2)
        return per_sample * layout.micro_batch * m * self.bytes

    def plan(self) -> tuple[list[Prediction], list[Prediction]]:
        """(fitting layouts fastest first, the smaller memory first among equals; refused
        layouts)."""
        fitting, refused = [], []
        for layout in self.candidates():
            prediction = self.predict(layout)
            (fitting if prediction.fits else refused).append(prediction)
        fitting.sort(key=lambda p: (p.step_s, p.memory_gib["total"]))
        return fitting, refused


def format_table(predictions: list[Prediction]) -> str:
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'vpp':>3} {'dp':>4} {'sp':>3} {'mb':>3} "
            f"{'recompute':>9} {'dist-opt':>8} {'t-tp':>4} {'pad%':>5} {'step s':>8} {'samples/s':>9} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'bubble':>6} {'GiB/rank':>8}")
    lines = [head]
    for i, p in enumerate(predictions, 1):
        lay = p.layout
        lines.append(
            f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.vpp:>3} {lay.dp:>4} {'y' if lay.sp else 'n':>3} "
            f"{lay.micro_batch:>3} {lay.recompute:>9} {'y' if lay.distributed_optimizer else 'n':>8} "
            f"{lay.teacher_tp_size:>4} {100 * p.padding:>5.1f} {p.step_s:>8.3f} "
            f"{p.samples_per_s:>9.1f} {p.tflops:>8.1f} "
            f"{100 * p.mfu:>5.1f}% {100 * p.bubble:>5.1f}% {p.memory_gib['total']:>8.1f}")
    return "\n".join(lines)

