"""Distributed checkpoints: save atomically, resume, reshard on load.

Layout of ``checkpoint.dir`` (default ``<run.dir>/checkpoints``)::

    latest              the name of the newest complete checkpoint, replaced atomically
    step_00000006/      megatron-core dist_checkpointing (torch_dist) directory
    teachers/           the frozen teachers, written once per run
    .tmp_*/             a save in progress (removed by the next save)

A checkpoint holds the student (single-rank shapes, see :mod:`parallel.checkpointing`), the
optimizer state in model space (fp32 master weights under bf16, Adam moments), the step, the
data position (samples consumed), the learning-rate schedule, every rank's RNG states and the
config. It is written into ``.tmp_<name>``; only after every rank has finished does rank 0 rename
it and point ``latest`` at it, so a crash mid-save leaves the previous checkpoint as ``latest``.
Any (tp, pp, vpp, dp) loads it; RNG states come back only at the layout that wrote them (the
model's randomness is seeded per sample and step and needs none of them). Weights from elsewhere
(an earlier stage; released checkpoints: a Hugging Face LLM or BERT, BEATs) come through
:mod:`megavideo.weights.adapters`.

One module over the usual 400 lines: the saving and the loading of each part of a run's state
(model, optimizer, teachers, RNG, data position) mirror each other and read best side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megavideo.config import FROZEN_AUDIO, Config, ConfigError
from megavideo.training.state import canonical_params, named_parameters
from megavideo.weights.adapters import (
    EarlierStage,
    ImportedWeights,
    OtherSubstage,
    model_differences,
    released_weights,
    substage,
)
from megavideo.weights.internvideo2 import progress
from parallel import optimizer_state
from parallel.checkpointing import (
    as_loaded,
    assemble,
    sharded_tensors,
    writer_tied_to_rank,
)
from parallel.comm import group_device
from parallel.lifetime import STOP_SIGNALS
from parallel.tensors import take_shard, whole_shape

log = logging.getLogger(__name__)

FORMAT = 1
EXIT_REQUEUE = 75  # saved on SIGUSR1/SIGTERM and stopped: requeue me (EX_TEMPFAIL)
_MAIN = (0, 0, 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_key(kind: str, name: str) -> str:
    """The key of a tensor in a checkpoint: ``model.<name>`` for the student, ``<kind>.<name>``
    for a teacher (``clip_teacher``, ``mae_teacher``); names are single-rank parameter names."""
    return f"model.{name}" if kind == "student" else f"{kind}.{name}"


def teacher_params(teachers) -> dict[str, torch.nn.Parameter]:
    """Checkpoint key -> parameter of both teachers (empty without teachers)."""
    if teachers is None:
        return {}
    return {checkpoint_key(kind, n): p for kind, module in (("clip_teacher", teachers.clip),
                                                            ("mae_teacher", teachers.mae))
            for n, p in named_parameters(module)}


def _parts(names: list[str], every: list[str]) -> str:
    """``names`` in short: a top-level module where all of its parameters are among them, else
    its submodules that are (a LoRA adapter's as ``<top>.lora``)."""
    chosen, out = set(names), []
    for top in dict.fromkeys(n.split(".")[0] for n in names):
        if all(n in chosen for n in every if n.split(".")[0] == top):
            out.append(top)
        else:
            out += dict.fromkeys(f"{top}.lora" if ".lora." in n else ".".join(n.split(".")[:2])
                                 for n in names if n.split(".")[0] == top)
    return ", ".join(out) or "nothing"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the one a root's ``latest`` names."""
    path = Path(path)
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    return path


def _rank0_decides(value):
    """Rank 0's answer, on every rank (file-system checks must not diverge)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_atomically(root: Path, name: str, state: dict, then=None,
                    queue: AsyncCallsQueue | None = None) -> Path:
    """dist_checkpointing.save into ``root/.tmp_<name>``, renamed to ``root/<name>`` by rank 0
    once every rank has finished, then ``then()`` on rank 0 (collective).

    With ``queue`` the files are written by a forked process while training goes on: each rank
    copies its share to the host before this returns, and the rename happens when the queue
    finds every rank done (:meth:`Checkpointer.poll`).
    """
    tmp, final = root / f".tmp_{name}", root / name

    def publish() -> None:
        if dist.get_rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            if then is not None:
                then()

    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    writer_tied_to_rank()
    dist.barrier()
    if queue is not None:
        with signals_held():
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(publish)
            queue.schedule_async_request(request)
        return final
    with signals_held():
        dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    publish()
    dist.barrier()
    return final


def point_latest(root: Path, name: str) -> None:
    """Make ``root/latest`` name ``name`` (atomically; rank 0 only)."""
    _write_atomically(root / "latest", name + "\n")


@contextlib.contextmanager
def signals_held():
    """SIGUSR1 and SIGTERM held back while a save starts its helper processes (megatron-core's
    multiprocessing Manager and file writers), which inherit the blocked mask: SLURM's warning
    signal, sent to every process of the step, would otherwise kill them mid-save. A signal
    that arrives meanwhile reaches :class:`StopSignal` when the save has started."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSignal:
    """SIGUSR1 or SIGTERM asks for a checkpoint at the next step boundary and an exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum
        log.warning("received %s: saving at the end of this step, then exiting with %d",
                    signal.Signals(signum).name, EXIT_REQUEUE)

    def agreed(self, save_due: bool = False) -> tuple[bool, bool]:
        """(whether any rank got a signal, whether any rank's ``save_due``), the same on every
        rank (one small all-reduce per step)."""
        flags = torch.tensor([int(self.received is not None), int(save_due)],
                             device=group_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, due = flags.tolist()
        return bool(stop), bool(due)


class SaveClock:
    """``checkpoint.every_minutes``: a save is due when that long has passed since the last one
    (or the start), which bounds what a crash loses whatever the step time."""

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


class Checkpointer:
    """Saves and restores a :class:`megavideo.training.loop.Trainer`."""

    def __init__(self, cfg: Config, trainer) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.root = cfg.checkpoint_dir
        self.resumed: dict = {}  # the metadata of the checkpoint a run resumed from
        self.origin = "from the start"  # where the run's weights come from, in words
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp = self.dp_group.size()
        self.dp_rank = self.dp_group.rank()
        self.params = canonical_params(trainer.chunks)
        self.layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp,
                       "world": dist.get_world_size()}
        self.queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None

    # -- what goes in --------------------------------------------------------------------

    def _coords(self, param) -> tuple[int, int]:
        """(TP rank, TP size) of a parameter: stage 3's video encoder has its own."""
        return getattr(param, "tp_coords", (self.tp_rank, self.tp))

    def _shards(self, key: str, param, local, index: int, copy: int, saving: bool,
                dtype: torch.dtype | None = None) -> list:
        shards = sharded_tensors(key, param, local, *self._coords(param),
                                 (copy, (self.dp_rank - index) % self.dp), dtype)
        return [s for s in shards if s.replica_id == _MAIN] if saving else shards

    def _model(self, saving: bool) -> dict:
        out = {}
        for index, (name, param) in enumerate(self.params):
            copy = 1 if getattr(param, "shared", False) else 0
            if saving and copy:
                continue
            local = param.detach() if saving else None  # the writer copies its own share
            shards = self._shards(checkpoint_key("student", name), param, local, index, copy,
                                  saving)
            if shards:  # empty containers would end up in the common state, differing by rank
                out.setdefault(name, []).extend(shards)
        return out

    def _optimizer(self, saving: bool, names: tuple[str, ...]) -> dict:
        slots = optimizer_state.slots(self.trainer.optimizer)
        distributed = optimizer_state.is_distributed(self.trainer.optimizer)
        out = {}
        for index, (name, param) in enumerate(self.params):
            if not param.requires_grad:  # frozen (stage 2's audio encoder): no optimizer state
                continue
            copy = 1 if getattr(param, "shared", False) else 0
            for state in names:
                local = None
                if saving:
                    local = optimizer_state.gather(param, slots.get(id(param)), state, self.dp_group,
                                                   index % self.dp, distributed)
                    if local is None or copy:
                        continue
                shards = self._shards(f"optimizer.{state}.{name}", param, local, index, copy,
                                      saving, torch.float32)
                if shards:
                    out.setdefault(state, {}).setdefault(name, []).extend(shards)
        return out

    def _teachers_params(self) -> dict:
        return teacher_params(self.trainer.stage.teachers)  # only the first pipeline stage has them

    def _teachers(self, saving: bool) -> dict:
        out = {}
        for index, (name, param) in enumerate(self._teachers_params().items()):
            local = param.detach() if saving else None
            shards = self._shards(name, param, local, index, 0, saving)
            if shards:
                out[name] = shards
        return out

    def _rng(self) -> ShardedObject:
        states = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        return ShardedObject("rng", states, (dist.get_world_size(),), (dist.get_rank(),),
                             replica_id=0)

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write checkpoint ``step_<step>`` (``step`` optimizer steps done) and point ``latest``
        at it; the teachers go to ``teachers/`` once. With ``checkpoint.async_save`` the step's
        files are written in the background (a save still in flight completes first)."""
        self.finish()
        name = f"step_{step:08d}"
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_*"):
                shutil.rmtree(stale)
        if self.cfg.stage == 1 and not _rank0_decides((self.root / "teachers").is_dir()):
            teachers = self._teachers(saving=True)
            save_atomically(self.root, "teachers", {"meta": {"format": FORMAT}}
                           | ({"teachers": teachers} if teachers else {}))
        names = self._saved_states()
        parts = {"model": self._model(saving=True), "optimizer": self._optimizer(saving=True, names=names)}
        state = {key: value for key, value in parts.items() if value}
        state.update(rng=self._rng(), meta=self._meta(step))
        started = time.perf_counter()

        def committed() -> None:
            point_latest(self.root, name)
            self._prune()
            log.info("saved checkpoint %s (%.1f s%s)", self.root / name,
                     time.perf_counter() - started, ", written in the background" if self.queue
                     else "")

        save_atomically(self.root, name, state, committed, self.queue)
        if self.queue is None:
            dist.barrier()
        return self.root / name

    def poll(self) -> None:
        """Commit a background save that every rank has finished writing (collective: call it
        on every rank once per step; one small all-reduce while a save is in flight)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for a background save and commit it (collective)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=True)

    def _saved_states(self) -> tuple[str, ...]:
        if self.cfg.train.precision == "fp32":  # the master weights are the model's own
            return optimizer_state.STATES[1:]
        return optimizer_state.STATES

    def _meta(self, step: int) -> dict:
        return {
            "format": FORMAT,
            "step": step,
            "consumed_samples": step * self.cfg.train.global_batch,
            "scheduler": self.trainer.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "layout": self.layout,
            "optimizer_states": list(self._saved_states()),
            "data": self.trainer.data_state(),
        }

    def _prune(self) -> None:
        steps = sorted(self.root.glob("step_*"))
        for old in steps[: max(len(steps) - self.cfg.checkpoint.keep, 0)]:
            shutil.rmtree(old)

    # -- loading ------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def restore(self) -> int:
        """Resume from ``latest`` if there is one, else start from ``checkpoint.load`` (weights
        only) if set; returns the first step to run."""
        latest = self.latest()
        resume = _rank0_decides(str(latest) if latest else "")
        if resume:
            self.origin = f"resuming from {resume}"
            return self.load(Path(resume), weights_only=False)
        vocab = len(self.trainer.stage.tokenizer) if self.cfg.stage == 2 else None
        for adapter in released_weights(self.cfg, vocab):
            self.import_weights(adapter)
        if not self.cfg.checkpoint.load:
            return 0
        self.origin = f"from the weights of checkpoint.load={self.cfg.checkpoint.load}"
        path = resolve(self.cfg.checkpoint.load)
        if (path / "metadata.json").is_file():
            return self.load(path, weights_only=True)
        teachers = Path(self.cfg.checkpoint.load) / "teachers"
        if not teachers.is_dir():
            raise ConfigError(f"checkpoint.load: {self.cfg.checkpoint.load} holds no MegaVideo "
                              "checkpoint (no metadata.json, no teachers/).")
        self._load_teachers(teachers)  # converted teachers, a fresh student
        log.info("loaded the teachers from %s", teachers)
        return 0

    def load(self, path: Path, weights_only: bool) -> int:
        if not (path / "metadata.json").is_file():
            raise ConfigError(f"{path} is not a MegaVideo checkpoint (no metadata.json).")
        meta = dist_checkpointing.load_common_state_dict(str(path))["meta"]
        if weights_only and meta["config"].get("stage", 1) < self.cfg.stage:
            return self.load_video_encoder(path, meta)  # an earlier stage's checkpoint
        if weights_only and substage(meta["config"]) != substage(self.cfg.to_dict()):
            return self.load_substage(path, meta)  # another stage-3 sub-stage's
        # the keys of this stage's model section (a checkpoint written before the sections were
        # split per stage holds every stage's)
        current = self.cfg.to_dict()["model"]
        saved_model = {k: v for k, v in meta["config"]["model"].items() if k in current}
        differences = model_differences(saved_model, current)
        if differences:
            raise ConfigError(f"checkpoint {path} was written for another model: "
                              f"{'; '.join(differences[:3])}.")
        teachers_dir = path.parent / "teachers"
        if teachers_dir.is_dir():
            self._load_teachers(teachers_dir)
        states = () if weights_only else tuple(meta.get("optimizer_states", ()))
        request = {"model": self._model(saving=False)}
        if states:
            request["optimizer"] = self._optimizer(saving=False, names=states)
        same_layout = meta.get("layout") == self.layout and not weights_only
        if same_layout:
            request["rng"] = self._rng()
        loaded = dist_checkpointing.load(request, str(path))
        self._apply(loaded, states, meta["step"])
        if same_layout:
            self._set_rng(loaded["rng"])
        step = 0 if weights_only else meta["step"]
        if not weights_only:
            self.resumed = meta
            self.trainer.scheduler.num_steps = step
            self.trainer.scheduler.step(increment=0)
        log.info("loaded %s from %s (step %d, written at %s)",
                 "weights" if weights_only else "checkpoint", path, meta["step"], meta.get("layout"))
        return step

    def load_video_encoder(self, path: Path, meta: dict) -> int:
        """Start a later stage from an earlier stage's checkpoint: its video encoder, at any
        layout, adapted by :class:`~megavideo.weights.adapters.EarlierStage`; everything else
        starts fresh."""
        audio = getattr(self.cfg.model, "audio", None)
        if audio is not None and audio.enabled and audio.frozen and not audio.weights:
            raise ConfigError(FROZEN_AUDIO)  # nothing else would load it
        adapter = EarlierStage(path, meta, self.cfg)
        only = self._load_adapted(path, adapter)
        log.info("loaded the video encoder of stage %d from %s (%d tensors, %d -> %d frames); "
                 "the rest of the stage-%d model starts fresh", adapter.stage, path, len(only),
                 *adapter.frames, self.cfg.stage)
        return 0

    def load_substage(self, path: Path, meta: dict) -> int:
        """Start a stage-3 sub-stage from another's checkpoint (align -> caption -> instruct):
        every tensor both models have, at any layout, the video encoder's position embedding
        resampled to this sub-stage's frames (:class:`~megavideo.weights.adapters.
        OtherSubstage`); the rest starts fresh (LoRA's adapters, the extra queries, the LLM
        after align: model.llm.weights)."""
        stored = {key: tuple(t.global_shape)
                  for key, t in dist_checkpointing.load_tensors_metadata(str(path)).items()}
        adapter = OtherSubstage(path, meta, self.cfg, stored)
        wrong = []
        for index, (name, param) in enumerate(self.params):
            key = checkpoint_key("student", name)
            whole = whole_shape(param, self._coords(param)[1])
            if adapter.key(name) is None or adapter.stored_shape(name, whole) != whole:
                continue  # absent, or resampled
            shape = tuple(self._shards(key, param, None, index, 0, saving=False)[0].global_shape)
            if stored[key] != shape:
                wrong.append(f"{name} {stored[key]} != {shape}")
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, wrong[:3])  # every rank fails alike, or none
        wrong = [w for ranks in everyone for w in ranks]
        if wrong:
            raise ConfigError(f"checkpoint {path} holds tensors of other shapes than this model's "
                              f"(saved != here): {'; '.join(wrong[:3])}.")
        only = self._load_adapted(path, adapter)
        log.info("loaded %d tensors of %s (%d -> %d frames); fresh on this rank: %s", len(only),
                 adapter.source, *adapter.frames,
                 _parts([name for name, _ in self.params if name not in only],
                        [name for name, _ in self.params]))
        return 0

    def _load_adapted(self, path: Path, adapter) -> set[str]:
        """The parameters ``adapter`` names in the checkpoint at ``path``, read at this layout
        and adapted; returns their names."""
        keys = {name: adapter.key(name) for name, _ in self.params}
        readers: dict[str, list[str]] = {}  # checkpoint key -> the parameters made from it
        for name, key in keys.items():
            if key is not None:
                readers.setdefault(key, []).append(name)
        request, whole = {}, {}
        for index, (name, param) in enumerate(self.params):
            if keys[name] is None or readers[keys[name]][0] != name:
                continue  # each stored tensor is read once, for every parameter made from it
            shape = whole_shape(param, self._coords(param)[1])
            stored = adapter.stored_shape(name, shape)
            local = None
            if stored != shape or len(readers[keys[name]]) > 1:
                # read whole, then adapted (a resampled tensor is not TP-split)
                local = torch.empty(stored, dtype=param.dtype)
                whole[name] = readers[keys[name]]
            copy = 1 if getattr(param, "shared", False) else 0  # a replica of stage 3's encoder
            request[name] = self._shards(checkpoint_key("student", keys[name]), param, local,
                                         index, copy, saving=False)
        loaded = dist_checkpointing.load({"model": request}, str(path))
        for first, names in whole.items():
            if first in loaded["model"]:
                tensor = loaded["model"][first][0]
                loaded["model"] |= {name: [adapter.adapt(name, tensor)] for name in names}
        only = {name for name, key in keys.items() if key is not None}
        self._apply(loaded, (), 0, only)
        return only

    def import_weights(self, adapter: ImportedWeights) -> None:
        """Import a released checkpoint in another layout into this rank's shards (each rank
        reads only the tensors of its pipeline stage, every missing one named before any is)."""
        names = [name for name, _ in self.params if adapter.key(name) is not None]
        adapter.check(names)
        shown = self.tp_rank == 0 and self.dp_rank == 0 and bool(names)
        tick = progress(len(names), f"importing {adapter.what.split(' in ')[0]}") if shown \
            else (lambda done: None)
        local, params = {}, dict(self.params)
        for done, name in enumerate(names, 1):
            param = params[name]
            rank, size = self._coords(param)
            shard = take_shard(param, adapter.read(name, whole_shape(param, size)), rank, size)
            local[name] = as_loaded(param, shard, rank)
            tick(done)
        self._apply({"model": local}, (), 0, set(local))
        log.info("imported %d tensors of %s", len(local), adapter.source)

    def _apply(self, loaded: dict, states: tuple[str, ...], step: int,
               only: set[str] | None = None) -> None:
        slots = optimizer_state.slots(self.trainer.optimizer)
        with torch.no_grad():
            for name, param in self.params:
                if only is not None and name not in only:
                    continue
                # a rank holding only padding heads loads nothing for them
                tp_rank = self._coords(param)[0]
                weights = assemble(param, loaded.get("model", {}).get(name, []), tp_rank)
                param.copy_(weights.to(param.dtype))
                slot = slots.get(id(param))
                if slot is None:
                    continue
                if "main" not in states:
                    optimizer_state.scatter(slot, "main", weights.float(), step)
                for state in states:
                    shards = loaded.get("optimizer", {}).get(state, {}).get(name, [])
                    full = assemble(param, shards, tp_rank)
                    optimizer_state.scatter(slot, state, full.float(), step)

    def _load_teachers(self, path: Path) -> None:
        request = self._teachers(saving=False)
        loaded = dist_checkpointing.load({"teachers": request} if request else {}, str(path))
        with torch.no_grad():
            for key, param in self._teachers_params().items():
                shards = loaded.get("teachers", {}).get(key, [])
                param.copy_(assemble(param, shards, self._coords(param)[0]).to(param.dtype))

    def _set_rng(self, states: dict) -> None:
        torch.set_rng_state(states["torch"])
        get_cuda_rng_tracker().set_states(states["tracker"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])


__all__ = ["EXIT_REQUEUE", "FORMAT", "Checkpointer", "SaveClock", "StopSignal", "checkpoint_key",
           "point_latest", "resolve", "save_atomically", "teacher_params"]
