"""megatron-core's configs, built from a run config in one place.

The TransformerConfig fields every model shares (precision, init, dropout, fused kernels,
recomputation, the pipeline split, point-to-point settings), the DDP config, the optimizer config,
the learning-rate schedule and the process group's timeout. The models add only their shapes
(:mod:`megavideo.models.specs`, :mod:`megavideo.models.llm`); the training loop hard-codes none of
these. What differs between backends is said where it is set: gloo on the CPU, NCCL on a GPU.
"""

from __future__ import annotations

import datetime

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from kernels.attention import ATTENTION
from kernels.backends import detect, importable, layer_backend
from megavideo.config.schema import FUSIONS, Config, ParallelConfig, TrainConfig
from megavideo.models.init import init_normal
from parallel.layout import megatron_layout, split_layers


def transformer_settings(train: TrainConfig, fp8: bool = True) -> dict:
    """TransformerConfig fields every model here shares: no dropout, the fused kernels
    ``train.fusions`` names, the core attention ``train.attention`` names, the init, the
    precision (FP8 GEMMs where ``fp8`` and ``train.precision=fp8``), recomputation, p2p that gloo
    runs."""
    bf16 = train.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    fused = fusions(train)
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **{field: name in fused for name, field in FUSIONS.items()},
        attention_backend=ATTENTION[train.attention],
        init_method=init_normal,
        output_layer_init_method=init_normal,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # batched p2p on NCCL (megatron-core's default); gloo: batched p2p with interleaving
        # silently corrupts later micro-batches (FIELD_NOTES)
        batch_p2p_comm=torch.cuda.is_available(),
        batch_p2p_sync=torch.cuda.is_available(),
        cuda_graph_scope=[],  # megatron-core's own default "full" warns that it is deprecated
        **recompute_settings(train),
        **fp8_settings(train, fp8),
    )


AUTO_FUSIONS = ("bias_activation", "bias_dropout")  # megatron-core's own (jit-scripted) kernels
COMPILED_FUSIONS = ("residual", "qk_norm")  # kernels.fused: torch.compile, Triton on a GPU


def fusions(train: TrainConfig, gpu: bool | None = None) -> set[str]:
    """The fused kernels ``train.fusions`` switches on. ``auto`` stands for, on a GPU: bias+GELU
    (megatron-core's is the tanh form InternVideo2 trains with; encoders with the exact GELU keep
    theirs unfused) or bias+SwiGLU, and bias-dropout-add; with Transformer Engine, RoPE; with
    TE or apex, the fused weight-gradient accumulation (not into torchao's FP8 linears); with
    Triton, InternVideo2's residual chain and q/k norm (:mod:`kernels.fused`). On the CPU
    ``auto`` is none: every layout computes today's numbers. megatron-core's masked softmax
    needs Megatron-LM's compiled kernels and is only ever switched on by name."""
    names = set(train.fusions) - {"auto"}
    if gpu is None:
        gpu = torch.cuda.is_available()
    if "auto" in train.fusions and gpu:
        found = detect()
        names |= set(AUTO_FUSIONS)
        if found.transformer_engine:
            names.add("rope")
        if (found.transformer_engine or found.apex) and fp8_backend(train) != "torchao":
            names.add("gradient_accumulation")
        if importable("triton"):
            names |= set(COMPILED_FUSIONS)
    return names


def fp8_backend(train: TrainConfig) -> str:
    """Who runs ``train.precision=fp8``'s GEMMs: ``te`` (Transformer Engine, the TE spec) or
    ``torchao`` (the local spec's linears); '' for the other precisions."""
    if train.precision != "fp8":
        return ""
    if train.fp8.backend != "auto":
        return train.fp8.backend
    return "te" if layer_backend() == "te" else "torchao"


def fp8_settings(train: TrainConfig, enabled: bool = True) -> dict:
    """TransformerConfig's FP8 fields: megatron-core's own for Transformer Engine (format, recipe,
    delayed scaling's amax history and margin, the first and last layers in bf16); for torchao
    the recipe in this codebase's ``float8`` field and the same bf16 layer counts, which its
    linears read. Nothing where ``enabled`` is false (a frozen teacher without fp8.teachers)."""
    backend = fp8_backend(train) if enabled else ""
    f = train.fp8
    bf16_layers = dict(first_last_layers_bf16=bool(f.bf16_first_layers or f.bf16_last_layers),
                       num_layers_at_start_in_bf16=f.bf16_first_layers,
                       num_layers_at_end_in_bf16=f.bf16_last_layers)
    if backend == "te":
        return dict(fp8=f.format, fp8_recipe=f.recipe, fp8_margin=f.margin,
                    fp8_amax_history_len=f.amax_history, fp8_amax_compute_algo=f.amax_algo,
                    **bf16_layers)
    if backend == "torchao":
        return dict(float8=f.recipe, **bf16_layers)
    return {}


def recompute_settings(train: TrainConfig) -> dict:
    """TransformerConfig's activation recomputation for ``train.recompute``: none, selective
    (megatron-core's core attention) or full (every layer, one at a time)."""
    recompute = {"none": None, "selective": "selective", "full": "full"}[train.recompute]
    return dict(
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )


def pipeline_settings(num_layers: int, parallel: ParallelConfig, pipelined: bool) -> dict:
    """TransformerConfig's pipeline fields for a stack of ``num_layers`` layers, split over the
    pipeline as :func:`parallel.layout.split_layers` says (or whole when not ``pipelined``)."""
    pp = parallel.pp if pipelined else 1
    layout = None
    if pp > 1:
        layout = megatron_layout(split_layers(num_layers, pp, parallel.vpp,
                                              parallel.pipeline_layout), pp)
    return dict(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if pp > 1 and parallel.vpp > 1 else None,
        pipeline_model_parallel_layout=layout,
    )


def overlap(cfg: Config, gpu: bool | None = None) -> tuple[bool, bool]:
    """(gradient reduce, parameter all-gather) overlapped with compute: ``parallel.overlap_*``
    where set; where null, on for a GPU run (NCCL: bucketed collectives hide behind the backward
    and the next forward) and off on the CPU (gloo, where they buy nothing), the gather only with
    the distributed optimizer and the overlapped reduce (which a gather asked for implies).
    ``gpu``: whether the run is on GPUs (default: this process's device; the planner plans one)."""
    par = cfg.parallel
    if gpu is None:
        gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
    grad = par.overlap_grad_reduce
    if grad is None:
        grad = gpu or par.overlap_param_gather is True
    param = par.overlap_param_gather
    if param is None:
        param = gpu and grad and par.distributed_optimizer
    return grad, param


def tp_comm_overlap(cfg: Config, gpu: bool | None = None) -> bool:
    """Whether the video encoder's TE linears overlap their SP communication with their GEMMs
    (``parallel.tp_comm_overlap``; null: where it runs, TE's spec on GPUs at tp > 1 with SP, in
    stages 1 and 2, whose one SP-split transformer gives TE's userbuffers their one shape; not
    with stage 2's image steps, a second sequence length)."""
    par = cfg.parallel
    if par.tp_comm_overlap is not None:
        return par.tp_comm_overlap
    if gpu is None:
        gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
    return (gpu and layer_backend() == "te" and par.tp > 1 and par.sp and cfg.stage in (1, 2)
            and not cfg.uses_images)


def ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    """Gradients reduced in fp32; the reduce (and, with the distributed optimizer, the parameter
    all-gather) overlapped with the backward and forward passes as :func:`overlap` says."""
    grad, param = overlap(cfg)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grad,
        overlap_param_gather=param,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def optimizer_config(cfg: Config, params_dtype: torch.dtype) -> OptimizerConfig:
    """``train.optimizer`` (adam or sgd) with the run's learning rate, decay, betas or momentum
    and gradient clipping; sharded over data-parallel ranks with ``parallel.distributed_optimizer``."""
    train = cfg.train
    return OptimizerConfig(
        optimizer=train.optimizer, lr=train.lr, min_lr=train.min_lr,
        weight_decay=train.weight_decay, adam_beta1=train.betas[0], adam_beta2=train.betas[1],
        adam_eps=train.eps, sgd_momentum=train.momentum, clip_grad=train.clip_grad,
        bf16=train.bf16, params_dtype=params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def no_weight_decay() -> dict:
    """get_megatron_optimizer's override: no decay on norms, biases, layer scale (all 1-D) and on
    position embeddings / CLS."""
    key = ParamKey(attr="no_weight_decay",
                   predicate=ParamPredicate(name="one_dim", fn=lambda p: p.dim() == 1))
    return {key: {"wd_mult": 0.0}}


def scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """megatron-core's scheduler: linear warm-up over ``train.warmup_steps``, then
    ``train.lr_schedule`` down to ``train.min_lr`` over ``train.lr_decay_steps`` (default: the
    run's steps); WSD holds the peak and anneals over its last ``train.wsd_decay_steps``."""
    train = cfg.train
    decay_steps = max(train.lr_decay_steps or train.steps, 1)
    wsd = train.lr_schedule == "WSD"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=train.lr_schedule, start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant",
        wsd_decay_steps=train.wsd_decay_steps if wsd else None,
        lr_wsd_decay_style=train.wsd_decay_style if wsd else None,
    )


def process_group_timeout(cfg: Config) -> datetime.timedelta:
    """How long a collective may wait for its peers before the job fails (NCCL and gloo)."""
    return datetime.timedelta(minutes=cfg.run.timeout_minutes)


def overlap_hooks(cfg: Config, chunks: list) -> dict:
    """The TransformerConfig fields through which megatron-core's schedules drive DDP when
    communication overlaps (as Megatron-LM's training sets them): no gradient sync on all but the
    last micro-batch, the bucketed reduce started by the schedule, and with the overlapped
    parameter gather (:func:`overlap`) the parameter all-gather of each model chunk."""
    grad, param = overlap(cfg)

    def each(method: str):
        functions = [getattr(chunk, method) for chunk in chunks]
        return functions[0] if len(functions) == 1 else functions

    hooks = {}
    if grad:
        hooks.update(no_sync_func=each("no_sync"), grad_sync_func=each("start_grad_sync"))
    if param:
        hooks.update(param_sync_func=each("start_param_sync"))
    return hooks
