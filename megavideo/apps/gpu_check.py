"""The GPU check: every GPU code path of MegaVideo exercised on one device in a few minutes, one
PASS, FAIL or SKIP line each (``python -m launch.gpu_check``; docs/cluster.md).

Each check runs in a child process of its own (one rank: its own CUDA context and NCCL world),
so a crash or a hang fails that check alone, within its time limit; the parent process only
finds out which packages are installed. Checks that read another's output (the CPU-written
checkpoint, the clips) run after it and SKIP when it did not pass. Where no CUDA device is
visible every check that needs one SKIPs with that reason; ``device="cpu"`` runs the same checks
on the CPU instead (gloo, the local spec), which is how the test suite checks the checks.

The references are independent of the GPU path under test: a CPU run of the same step (its loss,
its checkpoint and its weights, which the converter's round trip must also give back), PyAV's
decode of the clips DALI decodes, and the CPU's parameter counts.

One module over the usual 400 lines: nineteen short, independent checks and the runner that
isolates them, which an operator reads top to bottom when one fails.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megavideo.config import CONFIG_DIR
from parallel.distributed import free_port

ROOT = CONFIG_DIR.parent
ONE_RANK = ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=1", "parallel.sp=false",
            "parallel.pipeline_layout=[]", "parallel.distributed_optimizer=false"]
LOSS_RTOL = 1e-2  # GPU vs CPU loss of the same fp32 step (cuDNN convolutions run in TF32)
# the stage-1 vit-6b model (configs/stage1_vit6b.yaml) at full width, a few layers of each part
SLICE = ["model.student.num_layers=4", "model.clip_teacher.num_layers=4",
         "model.mae_teacher.num_layers=4", "model.clip_layers=2", "model.mae_layers=2",
         "train.global_batch=2", "train.micro_batch=1", "train.warmup_steps=0"]


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass(frozen=True)
class Context:
    workdir: Path
    device: str  # cuda | cpu

    def fresh_dir(self, name: str) -> Path:
        """The check ``name``'s own directory, emptied (an earlier run's checkpoints would be
        resumed from)."""
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], str]  # the PASS line's detail; raises Skip or fails with an error
    gpu: bool = True  # needs the device (SKIPs without one)
    after: tuple[str, ...] = ()  # checks whose outputs it reads
    limit_s: int = 60
    cpu: bool = False  # runs with the GPUs hidden (the CPU reference)
    in_parent: bool = False  # cheap and GPU-free: no child process


# --------------------------------------------------------------------------------------------
# helpers of the checks (they run in the child process)


def run_config(name: str, ctx: Context, run_dir: Path, overrides: list[str] = (), *,
               device: str | None = None):
    """The config file ``configs/<name>`` as a check runs it: one rank, a small batch, no
    warm-up, no saving, into ``run_dir``, on the check's device, then ``overrides``."""
    from megavideo.config import load_config

    return load_config(CONFIG_DIR / name, [
        *ONE_RANK, "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=0",
        "checkpoint.interval=0", "checkpoint.save_at_end=false", "run.tensorboard=false",
        f"run.dir={run_dir}", f"run.device={device or ctx.device}", *overrides])


class _Run:
    """A one-rank run driven step by step (what ``training.run`` does, without its loop)."""

    def __init__(self, cfg) -> None:
        from megavideo.training import data
        from megavideo.training.checkpoint import Checkpointer
        from megavideo.training.loop import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg)
        self.checkpointer = Checkpointer(cfg, self.trainer)
        self.step = self.checkpointer.restore()
        self.trainer.start_data(self.step, self.checkpointer.resumed, data.check(cfg))

    def train(self, steps: int) -> list[dict]:
        import math

        history = []
        for _ in range(steps):
            metrics = self.trainer.train_step(self.step)
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss")):
                raise RuntimeError(f"step {self.step}: non-finite loss {metrics['loss']}")
            history.append(metrics)
            self.step += 1
        return history

    def save(self) -> Path:
        return self.checkpointer.save(self.step)

    def state(self) -> dict[str, torch.Tensor]:
        """Every parameter (student and teachers), whole, in fp32 on the CPU."""
        from megavideo.training.checkpoint import teacher_params
        from megavideo.training.state import full_state

        state = {f"model.{k}": v for k, v in full_state(self.trainer.chunks).items()}
        for key, param in teacher_params(self.trainer.stage.teachers).items():
            state[key] = param.detach().float().cpu()
        return state


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """'' when both hold the same tensors exactly, else the first difference."""
    if set(a) != set(b):
        return f"different tensors: {sorted(set(a) ^ set(b))[:3]}"
    for key in sorted(a):
        if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            diff = (a[key] - b[key]).abs().max().item() if a[key].shape == b[key].shape else "shape"
            return f"{key} differs (max abs difference {diff})"
    return ""


def _close(loss: float, reference: float, what: str) -> str:
    rel = abs(loss - reference) / max(abs(reference), 1e-12)
    if rel > LOSS_RTOL:
        raise AssertionError(f"loss {loss:.6f} but {what} {reference:.6f} (relative difference "
                             f"{rel:.2e} > {LOSS_RTOL:g})")
    return f"loss {loss:.6f} ({what} {reference:.6f}, relative difference {rel:.1e})"


def _reference(ctx: Context) -> dict:
    path = ctx.workdir / "cpu_reference" / "reference.pt"
    return torch.load(path, weights_only=True)


def _tool(*args: str) -> None:
    """Run one of MegaVideo's command-line tools on this node, as a user would."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"python -m {' '.join(args[:2])} exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")


# --------------------------------------------------------------------------------------------
# the checks


def check_cuda(ctx: Context) -> str:
    if ctx.device == "cpu":
        return f"CPU mode: torch {torch.__version__}, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(0)
    x = torch.randn(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    if not torch.isfinite(x @ x).all():
        raise RuntimeError("a matmul on the device gave non-finite values")
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
            f"{torch.cuda.device_count()} visible; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}")


def check_nccl(ctx: Context) -> str:
    import torch.distributed as dist

    from parallel.comm import group_device
    from parallel.distributed import init_distributed

    init_distributed(datetime.timedelta(minutes=2))
    x = torch.ones(4, device=group_device())
    dist.all_reduce(x)
    dist.barrier()
    if x.tolist() != [1.0] * 4:
        raise RuntimeError(f"an all-reduce over one rank gave {x.tolist()}")
    backend = dist.get_backend()
    version = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else ""
    return f"{backend} {version}".strip() + f": all-reduce and barrier on {x.device}"


def _backend_line(name: str) -> str:
    from kernels import backends

    found = backends.detect()
    if not getattr(found, name):
        raise Skip(f"not importable ({found.reason(name)})")
    version = found.version(name) or "version unknown"
    if name == "transformer_engine":
        note = found.te_untested()
        return f"{version}; the TE spec runs" + (f" ({note})" if note else "")
    return version


def check_dali_found(_ctx: Context) -> str:
    from dataloaders import dali

    why = dali.missing()
    if why:
        raise Skip(why)
    return dali.summary()


def check_te_names(ctx: Context) -> str:
    """Every model built with TE's layers, its parameters under canonical names equal (name and
    shape) to the local spec's: what checkpoints, conversion and imports rely on."""
    from kernels import backends
    from megavideo.accounting.describe import model_parts
    from megavideo.config import load_config
    from megavideo.training.state import named_parameters
    from parallel.distributed import single_rank_world

    if ctx.device == "cpu" or not backends.detect().transformer_engine:
        raise Skip("Transformer Engine is not importable here: "
                   f"{backends.detect().reason('transformer_engine') or 'CPU mode'}")
    configs = [load_config(CONFIG_DIR / f"stage{i}_tiny.yaml", [*ONE_RANK, "parallel.encoder_tp=0"])
               for i in (1, 2, 3)]
    with single_rank_world():
        with backends.use_layer_backend("local"):
            local = model_parts(*configs)
        with backends.use_layer_backend("te"):
            te = model_parts(*configs)
    fused = 0
    for part, module in te.items():
        ours = {n: tuple(p.shape) for n, p in named_parameters(local[part])}
        theirs = {n: tuple(p.shape) for n, p in named_parameters(module)}
        if ours != theirs:
            raise AssertionError(f"{part}: TE and local names differ: "
                                 f"{sorted(set(ours.items()) ^ set(theirs.items()))[:3]}")
        fused += sum(n not in ours for n, _ in module.named_parameters())
    if not fused:
        raise AssertionError("no TE-fused norm was found: the TE spec did not run")
    return f"{len(te)} models: {fused} TE-fused norm parameters map onto the local spec's names"


def check_cpu_reference(ctx: Context) -> str:
    """Two fp32 steps of the tiny stage-1 model on the CPU, saved after the first: the
    reference the GPU's step, its checkpoint load and the converter are compared with."""
    out = ctx.fresh_dir("cpu_reference")
    run = _Run(run_config("stage1_tiny.yaml", ctx, out / "run", device="cpu"))
    first = run.train(1)
    run.save()
    state = run.state()
    second = run.train(1)
    torch.save({"losses": [first[0]["loss"], second[0]["loss"]], "state": state},
               out / "reference.pt")
    return f"losses {first[0]['loss']:.6f}, {second[0]['loss']:.6f}; saved after step 1"


def check_stage1_tiny(ctx: Context) -> str:
    reference = _reference(ctx)
    run = _Run(run_config("stage1_tiny.yaml", ctx, ctx.fresh_dir("stage1_tiny") / "run"))
    (metrics,) = run.train(1)
    return _close(metrics["loss"], reference["losses"][0], "CPU")


def check_stage1_6b_slice(ctx: Context) -> str:
    if ctx.device == "cpu":
        raise Skip("CPU mode: a vit-6b-width step needs a GPU")
    cfg = run_config("stage1_vit6b.yaml", ctx, ctx.fresh_dir("stage1_6b_slice") / "run", SLICE)
    if cfg.train.precision != "bf16":
        raise AssertionError(f"configs/stage1_vit6b.yaml trains in {cfg.train.precision}, not bf16")
    run = _Run(cfg)
    history = run.train(3)
    last = history[-1]
    mfu = f", MFU {100 * last['perf/mfu']:.1f}%" if "perf/mfu" in last else ""
    return (f"bf16, width {cfg.model.student.hidden_size}, 4 layers each: loss "
            f"{history[0]['loss']:.4f} -> {last['loss']:.4f}, {last['perf/step_s']:.3f} s/step, "
            f"{last['perf/model_tflops']:.0f} TFLOP/s{mfu}, peak {last['mem/peak_gib']:.1f} GiB")


def _stage_steps(name: str, ctx: Context, overrides: list[str] = ()) -> str:
    run = _Run(run_config(name, ctx, ctx.fresh_dir(name.removesuffix(".yaml")) / "run",
                       ["parallel.encoder_tp=0", *overrides]))
    history = run.train(2)
    terms = ", ".join(f"{k[5:]} {v:.3f}" for k, v in history[-1].items() if k.startswith("loss/"))
    return f"2 steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} ({terms})"


def check_stage2_tiny(ctx: Context) -> str:
    return _stage_steps("stage2_tiny.yaml", ctx)


def check_stage3_tiny(ctx: Context) -> str:
    return _stage_steps("stage3_tiny.yaml", ctx)


def check_checkpoint(ctx: Context) -> str:
    """Save on the device after one step, load into a fresh model: the same weights exactly,
    and the same next step."""
    out = ctx.fresh_dir("checkpoint")
    cfg = run_config("stage1_tiny.yaml", ctx, out / "run")
    run = _Run(cfg)
    run.train(1)
    path = run.save()
    saved = run.state()
    (expected,) = run.train(1)
    resumed = _Run(cfg)
    if resumed.step != 1:
        raise AssertionError(f"resumed at step {resumed.step}, not 1")
    differs = _differences(resumed.state(), saved)
    if differs:
        raise AssertionError(f"the loaded weights differ from the saved ones: {differs}")
    (metrics,) = resumed.train(1)
    return (f"{path.name}: {len(saved)} tensors loaded exactly; next step "
            + _close(metrics["loss"], expected["loss"], "the saving run"))


def check_cpu_checkpoint(ctx: Context) -> str:
    """The CPU's checkpoint resumed on the device: its weights exactly, then its next step."""
    from megavideo.training.checkpoint import point_latest

    reference = _reference(ctx)
    out = ctx.fresh_dir("cpu_checkpoint")
    written = ctx.workdir / "cpu_reference" / "run" / "checkpoints"
    (out / "run" / "checkpoints").mkdir(parents=True)
    for name in ("step_00000001", "teachers"):
        shutil.copytree(written / name, out / "run" / "checkpoints" / name)
    point_latest(out / "run" / "checkpoints", "step_00000001")
    run = _Run(run_config("stage1_tiny.yaml", ctx, out / "run"))
    differs = _differences(run.state(), reference["state"])
    if differs:
        raise AssertionError(f"the CPU-written checkpoint loaded wrong: {differs}")
    (metrics,) = run.train(1)
    return (f"{len(reference['state'])} tensors exactly as the CPU wrote them; next step "
            + _close(metrics["loss"], reference["losses"][1], "CPU"))


def check_official_import(ctx: Context) -> str:
    """``launch.convert export`` of the CPU checkpoint to the official layout, ``launch.convert
    import`` back on this node, and the imported files loaded on the device: the same weights."""
    reference = _reference(ctx)
    out = ctx.fresh_dir("official_import")
    config = str(CONFIG_DIR / "stage1_tiny.yaml")
    written = ctx.workdir / "cpu_reference" / "run" / "checkpoints"
    _tool("launch.convert", "export", config, "--checkpoint", str(written / "step_00000001"),
          "--out", str(out / "official"))
    _tool("launch.convert", "import", config, "--out", str(out / "imported"),
          *(f"--{kind.replace('_', '-')}={out / 'official' / f'{kind}.pth'}"
            for kind in ("student", "clip_teacher", "mae_teacher")))
    run = _Run(run_config("stage1_tiny.yaml", ctx, out / "run",
                       [f"checkpoint.load={out / 'imported'}"]))
    differs = _differences(run.state(), reference["state"])
    if differs:
        raise AssertionError(f"the imported official weights loaded wrong: {differs}")
    return f"exported, imported and loaded {len(reference['state'])} tensors exactly"


CLIPS = (("h264", 40), ("vp9", 48), ("h264", 56), ("vp9", 64))


def check_clips(ctx: Context) -> str:
    """Four short clips (H.264 and VP9) and their manifest, for the data checks."""
    from dataloaders.clips import write_clip
    from dataloaders.manifest import build_manifest

    out = ctx.fresh_dir("clips")
    for i, (codec, frames) in enumerate(CLIPS):
        write_clip(out / f"clip{i}", codec, frames=frames, width=128, height=96)
    built = build_manifest(out, out / "manifest.jsonl", workers=1, progress=False)
    if built.kept != len(CLIPS) or built.rejected:
        raise AssertionError(f"the manifest kept {built.kept} of {len(CLIPS)} clips")
    return f"{built.kept} clips (H.264, VP9) in {out / 'manifest.jsonl'}"


def check_manifest_pyav(ctx: Context) -> str:
    """Stage-1 steps from video files: PyAV decode workers, the clips moved to the device."""
    manifest = ctx.workdir / "clips" / "manifest.jsonl"
    run = _Run(run_config("stage1_tiny.yaml", ctx, ctx.fresh_dir("manifest_pyav") / "run",
                       ["data.source=manifest", f"data.manifest={manifest}", "data.backend=pyav",
                        "data.workers=1"]))
    history = run.train(2)
    attempts = sum(m["data/attempts"] for m in history)
    skipped = sum(m["data/skipped"] for m in history)
    if skipped:
        raise AssertionError(f"{skipped} of {attempts} decodes failed")
    return f"2 steps, {attempts} clips decoded, none skipped, loss {history[-1]['loss']:.4f}"


def check_dali_mixed(ctx: Context) -> str:
    """DALI's decode of the clips against PyAV's: NVDEC ('mixed') on a GPU, the CPU decoder in
    CPU mode (VP9 clips only)."""
    import numpy as np

    from dataloaders import dali
    from dataloaders.manifest import Manifest
    from dataloaders.pyav_decode import read_frames
    from dataloaders.sampling import Sampling
    from dataloaders.transform import crop_resize

    why = dali.missing()
    if why:
        raise Skip(why)
    manifest = Manifest(ctx.workdir / "clips" / "manifest.jsonl")
    rows = [r for r in range(len(manifest))
            if ctx.device == "cuda" or manifest.codec(r) in dali.CPU_CODECS]
    sampling = Sampling(8, seed=0)
    draws = [sampling.draw(0, r, int(manifest.num_frames[r]), int(manifest.heights[r]),
                           int(manifest.widths[r])) for r in rows]
    decoder = dali.DaliDecoder(64, len(rows), threads=2,
                               device_id=0 if ctx.device == "cuda" else None)
    video, failed = decoder.decode([np.fromfile(manifest.path(r), np.uint8) for r in rows], draws)
    if failed:
        raise AssertionError(f"DALI failed on {failed}")
    pyav = torch.stack([crop_resize(read_frames(manifest.path(r), d.frames), d.crop, 64)
                        for r, d in zip(rows, draws, strict=True)])
    diff = (video.cpu().float() - pyav.float()).abs().mean().item()
    if diff > 2.5:  # PyAV's and DALI's colour conversions differ by ~2 levels (FIELD_NOTES)
        raise AssertionError(f"DALI's frames differ from PyAV's by {diff:.2f} levels on average")
    return (f"{decoder.name}: {len(rows)} clips on {video.device}, mean difference to PyAV "
            f"{diff:.2f} levels of 255")


# what launch.describe counts for configs/stage1_vit6b.yaml on the CPU (the local spec)
VIT6B_PARAMETERS = {"blocks": 5_900_083_200, "model": 6_075_947_392,
                    "clip_teacher": 5_936_000_768, "mae_teacher": 1_011_667_072}


def check_describe_plan(ctx: Context) -> str:
    """``launch.describe`` and ``launch.plan`` of the 6B config on this node: the meta-device
    build (local spec, whatever the node has) counts what the CPU counts and allocates nothing."""
    from megavideo.accounting.describe import describe
    from megavideo.accounting.planner import Planner
    from megavideo.config import load_config

    cfg = load_config(CONFIG_DIR / "stage1_vit6b.yaml")
    counts = describe(cfg, 256)["parameters"]
    wrong = {k: counts[k] for k, v in VIT6B_PARAMETERS.items() if counts[k] != v}
    if wrong:
        raise AssertionError(f"describe counts {wrong}, the CPU {VIT6B_PARAMETERS}")
    fitting, refused = Planner(cfg, 256, "h100", cfg.train.global_batch).plan()
    if not fitting:
        raise AssertionError("the planner fits no layout of the 6B config on 256 H100s")
    allocated = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
    if allocated:
        raise AssertionError(f"describe and plan left {allocated} bytes allocated on the GPU")
    return (f"{counts['model'] / 1e9:.3f}B parameters as on the CPU; {len(fitting)} layouts fit "
            f"on 256 x H100, {len(refused)} refused")

BUDGET_S = 480  # the whole check: a check that would start later FAILs as out of time
CHECKS = (
    Check("cuda", check_cuda),
    Check("nccl", check_nccl),
    Check("transformer_engine", lambda _c: _backend_line("transformer_engine"), gpu=False,
          in_parent=True),
    Check("flash_attn", lambda _c: _backend_line("flash_attn"), gpu=False, in_parent=True),
    Check("apex", lambda _c: _backend_line("apex"), gpu=False, in_parent=True),
    Check("dali", check_dali_found, gpu=False, in_parent=True),
    Check("te_names", check_te_names, limit_s=90),
    Check("cpu_reference", check_cpu_reference, cpu=True, limit_s=90),
    Check("stage1_tiny", check_stage1_tiny, after=("cpu_reference",)),
    Check("stage1_6b_slice", check_stage1_6b_slice, limit_s=150),
    Check("stage2_tiny", check_stage2_tiny),
    Check("stage3_tiny", check_stage3_tiny),
    Check("checkpoint", check_checkpoint, limit_s=90),
    Check("cpu_checkpoint", check_cpu_checkpoint, after=("cpu_reference",)),
    Check("official_import", check_official_import, after=("cpu_reference",), limit_s=120),
    Check("clips", check_clips, cpu=True),
    Check("manifest_pyav", check_manifest_pyav, after=("clips",), limit_s=90),
    Check("dali_mixed", check_dali_mixed, after=("clips",)),
    Check("describe_plan", check_describe_plan, limit_s=90),
)


# --------------------------------------------------------------------------------------------
# running them


def _outcome(check: Check, ctx: Context) -> Result:
    """Run ``check`` in this process."""
    start = time.perf_counter()
    try:
        detail, status = check.run(ctx), "PASS"
    except Skip as why:
        detail, status = str(why), "SKIP"
    except Exception as err:  # a failing check is a FAIL line, whatever it raised
        detail, status = f"{type(err).__name__}: {err}".splitlines()[0], "FAIL"
    return Result(check.name, status, detail, time.perf_counter() - start)


def run_one(name: str, ctx: Context) -> Result:
    """The child's side: run the check ``name`` and leave its result in ``<workdir>/<name>.json``."""
    from parallel.distributed import shutdown

    check = next(c for c in CHECKS if c.name == name)
    result = _outcome(check, ctx)
    (ctx.workdir / f"{name}.json").write_text(json.dumps(asdict(result)))
    shutdown()  # a one-rank world: nothing to agree on
    return result


def _in_child(check: Check, ctx: Context, limit_s: float) -> Result:
    """Run ``check`` in a one-rank child process, within ``limit_s``."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    device = ctx.device
    if check.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        device = "cpu"
    out = ctx.workdir / f"{check.name}.json"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(ctx.workdir / f"{check.name}.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "launch.gpu_check", "--run", check.name, "--workdir",
             str(ctx.workdir), "--device", device], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return Result(check.name, "FAIL", f"did not finish within {limit_s:.0f} s (log: "
                          f"{log.name})", time.perf_counter() - start)
    if out.is_file():
        return Result(**json.loads(out.read_text()))
    lines = (ctx.workdir / f"{check.name}.log").read_text().strip().splitlines()
    return Result(check.name, "FAIL", f"the check's process exited {child.returncode}: "
                  f"{lines[-1] if lines else 'no output'}", time.perf_counter() - start)


def run_all(workdir: Path, device: str = "auto", only: tuple[str, ...] = (),
            report: Callable[[Result], None] = lambda _r: None,
            budget_s: float = BUDGET_S) -> list[Result]:
    """Every check (or those named in ``only``, with the ones they read), in order; ``device``
    auto: the GPU when one is visible (else the GPU checks SKIP), cuda: the GPU, cpu:
    everything on the CPU; all of them within ``budget_s``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "none"
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir, "cpu" if device == "cpu" else "cuda")
    wanted = set(only) | {dep for c in CHECKS if c.name in only for dep in c.after}
    results: dict[str, Result] = {}
    deadline = time.monotonic() + budget_s
    for check in CHECKS:
        if only and check.name not in wanted:
            continue
        unmet = [d for d in check.after if results.get(d) is None or results[d].status != "PASS"]
        left = deadline - time.monotonic()
        if check.gpu and device == "none":
            result = Result(check.name, "SKIP", "no CUDA device: "
                            + (_why_no_cuda() or "torch.cuda.is_available() is false"))
        elif unmet:
            result = Result(check.name, "SKIP", f"needs {', '.join(unmet)}, which did not pass")
        elif check.in_parent:
            result = _outcome(check, ctx)
        elif left < 1:
            result = Result(check.name, "FAIL", f"not started: the checks before it used the "
                            f"whole {budget_s:.0f} s budget")
        else:
            result = _in_child(check, ctx, min(check.limit_s, left))
        results[check.name] = result
        report(result)
    return list(results.values())


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return ""


def format_result(result: Result) -> str:
    return f"{result.status:<4}  {result.name:<18} {result.detail}  ({result.seconds:.1f} s)"
