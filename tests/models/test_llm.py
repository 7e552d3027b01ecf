"""Stage 3's LLM decoder (issue 7 groundwork): Mistral's shape on megatron-core's GPT model."""

from __future__ import annotations

import torch

from tests.distributed import spawn
from tests.models import llm_worker


def test_mistral_7b_shape_and_a_causal_tiny_decoder(tmp_path):
    """Mistral-7B with a 32768-token vocabulary is 7,248,023,552 parameters (7,241,732,096 for
    v0.1's 32000 tokens, plus 768 x 4096 rows in the embedding and the untied output layer)."""
    out = tmp_path / "llm.pt"
    spawn(1, llm_worker.count_and_run, str(out))
    got = torch.load(out)
    assert got["total"] == 7_241_732_096 + 2 * 768 * 4096
    assert got["counts"]["embedding"] == got["counts"]["output_layer"] == 32768 * 4096
    assert got["logits"] == (2, 12, 256) and got["loss"] == (2, 12)
    assert got["finite"] and got["causal"] and got["grads"]
