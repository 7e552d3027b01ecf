"""Rank code of the activation-memory test: saved bytes per layer of the stage-1 student's block
stack and of the stage-3 LLM decoder, at tp 1 and 2, with and without SP, for each recomputation.

Each case is (name, kind, tp, sp, recompute, precision, extra overrides); the measured bytes per
layer on rank 0 go to a JSON file. tp 1 cases run as data parallelism over the two ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from megavideo.accounting.activations import measure_layer_bytes
from megavideo.config import load_config
from megavideo.models.llm import build_llm, llm_config
from megavideo.models.specs import transformer_config
from megavideo.models.vit import block_stack
from parallel.distributed import init_distributed, init_model_parallel
from tests.distributed import clear_attention_backend_variables

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOKENS, MICRO_BATCH, LAYERS = 128, 2, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _overrides(tp: int, sp: bool, recompute: str, precision: str, extra: list[str]) -> list[str]:
    return [f"parallel.tp={tp}", "parallel.pp=1", f"parallel.sp={str(sp).lower()}",
            f"train.recompute={recompute}", f"train.precision={precision}", *extra]


def _rows(tp: int, sp: bool) -> int:
    return TOKENS // tp if sp else TOKENS


def _vit(tp, sp, recompute, precision, extra) -> float:
    cfg = load_config(CONFIGS / "stage1_tiny.yaml", _overrides(tp, sp, recompute, precision, extra))
    vit = cfg.model.student
    config = transformer_config(vit, cfg.parallel, cfg.train, pipelined=False, sequence_parallel=sp)
    stack = block_stack(vit, config, LAYERS).train()
    x = torch.randn(_rows(tp, sp), MICRO_BATCH, vit.hidden_size, dtype=DTYPES[precision],
                    requires_grad=True)  # [s(/tp), b, h]: this rank's part of the residual stream
    drop_u = torch.rand(MICRO_BATCH, vit.num_layers, 2) if vit.drop_path else None
    return measure_layer_bytes(stack, x, None, drop_u)


def _llm(tp, sp, recompute, precision, extra) -> float:
    clear_attention_backend_variables()  # cases with other attention kernels share this process
    cfg = load_config(CONFIGS / "stage3_tiny.yaml", _overrides(tp, sp, recompute, precision, extra))
    llm = cfg.model.llm
    config = llm_config(llm, cfg.parallel, cfg.train)
    model = build_llm(llm, config, num_layers=LAYERS).train()
    x = torch.randn(_rows(tp, sp), MICRO_BATCH, llm.hidden_size, dtype=DTYPES[precision],
                    requires_grad=True)
    causal = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), 1)[None, None]  # shared
    return measure_layer_bytes(model.decoder, hidden_states=x, attention_mask=causal,
                               rotary_pos_emb=model.rotary_pos_emb(TOKENS))


def measure(rank: int, world: int, cases: list, out: str) -> None:
    """Measured bytes per layer for every case, written by rank 0 as {name: bytes}."""
    init_distributed()
    results = {}
    for name, kind, tp, sp, recompute, precision, extra in cases:
        init_model_parallel(tp, 1, 1, seed=0)
        run = _vit if kind == "vit" else _llm
        results[name] = run(tp, sp, recompute, precision, extra)
    parallel_state.destroy_model_parallel()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
