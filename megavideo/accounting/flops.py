"""Analytic matmul FLOPs of one training step: the whole global batch, every device together.

A matmul of [M, K] x [K, N] costs 2 M K N (a convolution counts as the matmul it is); nothing else
(norms, softmax, losses) is counted. The count follows the models as this repository builds them
(megatron-core's local spec: no flash attention, so the full s x s score matrix, causal or not):

- forward: every matmul of the step, the frozen parts' too (the stage-1 teachers, a frozen audio
  or video encoder, which run under no_grad);
- backward: per matmul, its forward again for each operand gradient the step computes, the
  input's when it needs one and the weight's when it is trainable. megatron-core's Column/
  RowParallelLinear with a trainable weight computes its input gradient even when the input needs
  none (its autograd Function always does): 2x; with a frozen weight 1x if the input needs a
  gradient, else nothing. Frozen parts under no_grad: 0;
- recompute (``train.recompute``): ``full`` re-runs the forward of every encoder layer in the
  autograd graph (the video encoder's, and the text, audio and QFormer layers'); ``selective``
  re-runs megatron-core's core attention (q k^T and p v) of those layers. The stage-3 LLM's
  config sets no recomputation, so it has none;
- fp8: of the hardware FLOPs, the transformer layers' linears (real heads and tokens) that run as
  FP8 GEMMs under ``train.precision=fp8``, but for the ``fp8.bf16_first_layers`` and
  ``bf16_last_layers`` of each transformer and the frozen teachers without ``fp8.teachers``;
- padding: what the padding heads (``parallel.layout.padded_heads``: heads padded to a multiple
  of the TP degree, in the video encoder and the stage-1 teachers) and the sequence-parallel
  padding tokens of the video encoder add, forward, backward and recomputation together.

``model`` (forward + backward, real heads and tokens) is what MFU counts; ``hardware`` adds
recomputation and padding, what the chips execute. Pure arithmetic on the config: a planner calls
it for hundreds of layouts.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from functools import lru_cache
from pathlib import Path

from dataloaders.tokenizer import QFormerText
from megavideo.config import (
    AudioConfig,
    Config,
    EncoderConfig,
    LLMConfig,
    QFormerConfig,
    Stage3ModelConfig,
    ViTConfig,
    padded_vocab,
)
from megavideo.models.embedding import Tokens
from parallel.layout import padded_heads

BERT_VOCAB = 30522  # bert-base/large-uncased: the text vocabulary when the vocab file is unreadable


@dataclass
class StepFlops:
    """One step's matmul FLOPs per model part (see the module docstring)."""

    forward: dict[str, float] = field(default_factory=dict)
    backward: dict[str, float] = field(default_factory=dict)
    recompute: dict[str, float] = field(default_factory=dict)
    padding: float = 0.0
    # of the hardware FLOPs, what runs as FP8 GEMMs under train.precision=fp8 (the transformer
    # layers' linears, real heads and tokens; the rest, padding included, runs in bf16)
    fp8: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> float:
        """Forward + backward of the real heads and tokens: what MFU counts."""
        return sum(self.forward.values()) + sum(self.backward.values())

    @property
    def hardware(self) -> float:
        """What the chips execute: the model FLOPs plus recomputation and padding."""
        return self.model + sum(self.recompute.values()) + self.padding

    def to_dict(self) -> dict:
        return {"forward": dict(self.forward), "backward": dict(self.backward),
                "recompute": dict(self.recompute), "padding": self.padding,
                "fp8": dict(self.fp8), "model": self.model, "hardware": self.hardware}


def _video_tokens(cfg: Config) -> Tokens:
    """The video encoder's tokens at the layout's TP degree (stage 3: every patch at its own
    encoder_tp)."""
    par = cfg.parallel
    if cfg.stage == 3:
        return Tokens.whole(cfg.model, par.encoder_tp_size, par.sp, cfg.train.precision == "fp8")
    return Tokens.of(cfg.model, par.tp, par.sp, cfg.train.precision == "fp8")


@dataclass(frozen=True)
class _Cost:
    """Per-sample FLOPs of some matmuls: forward, backward, the forward of the core attention
    among them (what selective recomputation re-runs), and the forward and backward of the
    transformer layers' linears among them (what FP8 runs)."""

    fwd: float = 0.0
    bwd: float = 0.0
    attn: float = 0.0
    gemm: float = 0.0
    gemm_bwd: float = 0.0

    def __add__(self, other: _Cost) -> _Cost:
        return _Cost(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __mul__(self, k: float) -> _Cost:
        return _Cost(*(a * k for a in astuple(self)))

    __rmul__ = __mul__


def _linear(rows: float, n_in: int, n_out: int, grad_in: bool, trainable: bool,
            megatron: bool = True) -> _Cost:
    """``rows`` tokens through an n_in -> n_out linear (megatron-core's parallel linear, or a
    torch one: nn.Linear, F.linear, a convolution)."""
    f = 2.0 * rows * n_in * n_out
    passes = (2 if trainable else int(grad_in)) if megatron else int(grad_in) + int(trainable)
    return _Cost(f, passes * f)


def _layer_linear(rows: float, n_in: int, n_out: int, grad_in: bool, trainable: bool) -> _Cost:
    """A transformer layer's parallel linear: FP8 under ``train.precision=fp8``."""
    cost = _linear(rows, n_in, n_out, grad_in, trainable)
    return _Cost(cost.fwd, cost.bwd, gemm=cost.fwd, gemm_bwd=cost.bwd)


def _mm(rows: float, inner: int, cols: float, grad_a: bool, grad_b: bool) -> _Cost:
    """[rows, inner] x [inner, cols] of two activations."""
    f = 2.0 * rows * inner * cols
    return _Cost(f, (int(grad_a) + int(grad_b)) * f)


def _attention(queries: float, keys: float, width: int, q_grad: bool, kv_grad: bool,
               core: bool = True) -> _Cost:
    """Scores q k^T and context p v over ``width`` = heads x head dim channels; ``core``:
    megatron-core's core attention (re-run by selective recomputation)."""
    scores = _mm(queries, width, keys, q_grad, kv_grad)
    context = _mm(queries, keys, width, q_grad or kv_grad, kv_grad)
    total = scores + context
    return _Cost(total.fwd, total.bwd, total.fwd if core else 0.0)


def _vit_layer(tokens: float, vit: EncoderConfig, heads: int, grad: bool, train: bool) -> _Cost:
    """An InternVideo2 block (pre-norm, with or without qkv bias: the same matmuls) with
    ``heads`` heads of the layer's head dim (padding heads included when ``heads`` counts them)."""
    d, width = vit.hidden_size, heads * vit.head_dim
    g = grad or train
    return (_layer_linear(tokens, d, 3 * width, grad, train)
            + _attention(tokens, tokens, width, g, g) + _layer_linear(tokens, width, d, g, train)
            + _layer_linear(tokens, d, vit.mlp_hidden_size, g, train)
            + _layer_linear(tokens, vit.mlp_hidden_size, d, g, train))


def vit_layer_flops(vit: EncoderConfig, tokens: int, trained: bool = True) -> tuple[float, float]:
    """Per-sample (forward, backward) matmul FLOPs of one InternVideo2 block on ``tokens`` tokens
    (its real heads; backward 0 for a frozen block)."""
    cost = _vit_layer(tokens, vit, vit.num_heads, grad=trained, train=trained)
    return cost.fwd, cost.bwd


def _post_norm_layer(tokens: float, enc: EncoderConfig, grad: bool, train: bool,
                     memory: float = 0, memory_width: int = 0, memory_grad: bool = False) -> _Cost:
    """A post-norm encoder layer (BERT, BEATs, the QFormer), cross-attending to ``memory``
    tokens ``memory_width`` wide when ``memory`` is set."""
    h, mlp = enc.hidden_size, enc.mlp_hidden_size
    g = grad or train
    cost = (_layer_linear(tokens, h, 3 * h, grad, train) + _attention(tokens, tokens, h, g, g)
            + _layer_linear(tokens, h, h, g, train))
    if memory:
        mg = memory_grad or train
        cost += (_layer_linear(tokens, h, h, g, train)
                 + _layer_linear(memory, memory_width, 2 * h, memory_grad, train)
                 + _attention(tokens, memory, h, g, mg) + _layer_linear(tokens, h, h, g or mg, train))
        g = g or mg
    return cost + _layer_linear(tokens, h, mlp, g, train) + _layer_linear(tokens, mlp, h, g, train)


def _pool(tokens: float, dim: int, out_dim: int, grad: bool, train: bool) -> _Cost:
    """InternVideo2's attention pool: one query (the mean token) over ``tokens`` tokens."""
    g = grad or train
    return (_linear(1, dim, dim, grad, train) + 2 * _linear(tokens, dim, dim, grad, train)
            + _attention(1, tokens, dim, g, g, core=False) + _linear(1, dim, out_dim, g, train))


def _patch_embed(vit: ViTConfig, frames: int, train: bool) -> _Cost:
    """The tubelet convolution over ``frames`` frames (the input needs no gradient)."""
    tokens = vit.patches_per_frame * (frames // vit.tubelet_size)
    return _linear(tokens, 3 * vit.tubelet_size * vit.patch_size ** 2, vit.hidden_size, False, train,
                   megatron=False)


class _Tally:
    """Adds up the parts of one step; ``recompute`` is ``train.recompute``, ``fp8`` the share of
    each part's layers that runs FP8 GEMMs (absent: none)."""

    def __init__(self, recompute: str, fp8: dict[str, float] | None = None) -> None:
        self.flops = StepFlops()
        self.recompute = recompute
        self.fp8 = fp8 or {}

    def add(self, part: str, cost: _Cost, samples: float, recompute: float = 0.0) -> None:
        f = self.flops
        for table, value in ((f.forward, cost.fwd), (f.backward, cost.bwd),
                             (f.recompute, recompute)):
            table[part] = table.get(part, 0.0) + value * samples

    def _recomputed(self, cost: _Cost) -> float:
        if not cost.bwd:  # not in the autograd graph: nothing to recompute
            return 0.0
        return {"full": cost.fwd, "selective": cost.attn}.get(self.recompute, 0.0)

    def layers(self, part: str, real: _Cost, samples: float, padded: _Cost | None = None) -> None:
        """Encoder layers (recomputed per ``train.recompute``); ``padded``: the same layers with
        their padding heads and tokens, whose excess goes to ``padding``."""
        self.add(part, real, samples, self._recomputed(real))
        if self.fp8.get(part):
            again = real.gemm if self.recompute == "full" and real.bwd else 0.0
            self.flops.fp8[part] = self.flops.fp8.get(part, 0.0) + self.fp8[part] * samples * (
                real.gemm + real.gemm_bwd + again)
        if padded is not None:
            excess = (padded.fwd + padded.bwd + self._recomputed(padded)
                      - real.fwd - real.bwd - self._recomputed(real))
            self.flops.padding += excess * samples


def _video_encoder(t: _Tally, part: str, vit: ViTConfig, layers: int, tokens: Tokens, tp: int,
                   samples: float, train: bool) -> None:
    """Patch embedding (over every frame) and ``layers`` blocks on the visible tokens."""
    t.add(part, _patch_embed(vit, vit.num_frames, train), samples)
    real = _vit_layer(tokens.real, vit, vit.num_heads, train, train)
    padded = _vit_layer(tokens.length, vit, padded_heads(vit.num_heads, tp), train, train)
    t.layers(part, real * layers, samples, padded * layers)


def teacher_input(vit: ViTConfig) -> tuple[int, int]:
    """(images per clip, tokens per image) a frozen teacher sees: each frame as an image (CLIP)
    or the whole clip (MAE), its CLS token included."""
    images = vit.num_frames if vit.per_frame else 1
    frames = 1 if vit.per_frame else vit.num_frames
    return images, int(vit.cls_token) + vit.patches_per_frame * (frames // vit.tubelet_size)


def _teacher(t: _Tally, part: str, vit: ViTConfig, tp: int, samples: float, pooled: bool) -> None:
    """A frozen teacher, forward only: per-frame images (CLIP, with its attention pool) or the
    whole clip (MAE)."""
    images, n = teacher_input(vit)
    frames = 1 if vit.per_frame else vit.num_frames
    t.add(part, _patch_embed(vit, frames, False), samples * images)
    real = _vit_layer(n, vit, vit.num_heads, False, False) * vit.num_layers
    padded = _vit_layer(n, vit, padded_heads(vit.num_heads, tp), False, False) * vit.num_layers
    t.layers(part, real, samples * images, padded)
    if pooled:
        t.add(part, _pool(n, vit.hidden_size, vit.pool_dim, False, False), samples * images)


def _stage1(cfg: Config, t: _Tally) -> None:
    model, par, b = cfg.model, cfg.parallel, cfg.train.global_batch
    student = model.student
    tokens = _video_tokens(cfg)
    n, d = tokens.real, student.hidden_size
    _video_encoder(t, "student", student, student.num_layers, tokens, par.tp, b, True)
    t.add("student", _pool(n, d, student.pool_dim, True, True), b)
    heads = (model.clip_layers * _linear(n, d, model.clip_teacher.hidden_size, True, True)
             + model.mae_layers * (_linear(n - 1, d, d, True, True)
                                   + _linear(n - 1, d, model.mae_teacher.hidden_size, True, True))
             + _linear(1, student.pool_dim, model.clip_teacher.pool_dim, True, True))
    t.add("heads", heads, b)
    _teacher(t, "clip_teacher", model.clip_teacher, par.teacher_tp_size, b, pooled=True)
    _teacher(t, "mae_teacher", model.mae_teacher, par.teacher_tp_size, b, pooled=False)


@lru_cache(maxsize=16)
def _text_vocab(path: str) -> int:
    """The text vocabulary of a BERT vocab file (its distinct lines, as
    :class:`dataloaders.tokenizer.WordPiece` reads it)."""
    try:
        return len({line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()})
    except OSError:
        return BERT_VOCAB


def _audio(t: _Tally, audio: AudioConfig, samples: float) -> None:
    """BEATs: patch convolution, projection, grouped position convolution, post-norm layers with
    the relative position gate's linear."""
    train = not audio.frozen
    n, h, k = audio.tokens, audio.hidden_size, audio.pos_conv_kernel
    pos_out = n + 2 * (k // 2) - k + 1  # before the trim of an even kernel
    embed = (_linear(n, audio.patch_size ** 2, audio.patch_dim, False, train, megatron=False)
             + _linear(n, audio.patch_dim, h, train, train, megatron=False)
             + _linear(pos_out, h // audio.pos_conv_groups * k, h, train, train, megatron=False))
    t.add("audio", embed, samples)
    layer = _post_norm_layer(n, audio, train, train)
    if audio.relative_position:  # the gate's linear on each head's queries (an F.linear)
        layer += _linear(n * audio.num_heads, audio.head_dim, 8, train, train, megatron=False)
    t.layers("audio", layer * audio.num_layers, samples)


def _stage2(cfg: Config, t: _Tally, dp: int) -> None:
    model, par, train = cfg.model, cfg.parallel, cfg.train
    student, text, audio, obj = model.student, model.text, model.audio, model.objectives
    b = train.global_batch
    gathered = train.micro_batch * dp  # rows of the contrast's and the matching's similarities
    tokens = _video_tokens(cfg)
    n, d, ht, e = tokens.real, student.hidden_size, text.hidden_size, obj.embed_dim
    fusion = obj.fusion_dim or d
    _video_encoder(t, "video", student, student.num_layers, tokens, par.tp, b, True)
    t.add("video", _pool(n, d, student.pool_dim, True, True), b)
    weights = {name: getattr(obj, name) for name in ("vtc", "vtm", "mlm", "avtc", "avtm", "avmlm")
               if getattr(obj, name) and (audio.enabled or not name.startswith("av"))}
    heads = _linear(1, student.pool_dim, e, True, True) + _linear(1, ht, e, True, True)
    if obj.fusion_dim:
        heads += _linear(n, d, fusion, True, True)
    pairs = [(("vtc", "vtm", "mlm"), n)]  # the terms of each memory, its tokens
    if audio.enabled:
        _audio(t, audio, b)
        na = audio.tokens
        heads += (_linear(1, audio.hidden_size, e, not audio.frozen, True)
                  + _linear(1, 2 * e, e, True, True)
                  + _linear(na, audio.hidden_size, fusion, not audio.frozen, True))
        pairs.append((("avtc", "avtm", "avmlm"), na + n))
    length, first = text.max_length, text.num_layers - text.fusion_layers
    text_mode = _post_norm_layer(length, text, True, True) * first
    encodes = 1 + any(name in weights for name in ("mlm", "avmlm"))  # captions, masked captions
    t.layers("text", text_mode * encodes, b)
    vocab = padded_vocab(_text_vocab(text.vocab_file))
    for (contrast, matching, mlm), memory in pairs:
        fused = _post_norm_layer(length, text, True, True, memory, fusion, True) * text.fusion_layers
        if contrast in weights:
            heads += 2 * _mm(1, e, gathered, True, True)
        if matching in weights:
            heads += 2 * _mm(1, e, gathered, False, False)  # hard-negative draws, no_grad
            heads += _linear(3, ht, 2, True, True, megatron=False)
            t.layers("text", fused * 3, b)  # positives, negative videos, negative captions
        if mlm in weights:
            heads += _linear(length, ht, ht, True, True, megatron=False) + _linear(
                length, ht, vocab, True, True)
            t.layers("text", fused, b)
    t.add("heads", heads, b)


def _qformer_and_llm(t: _Tally, model: Stage3ModelConfig, video_out_grad: bool, n: int,
                     samples: float) -> None:
    """The QFormer on ``n`` video tokens (needing a gradient when ``video_out_grad``), then the
    LLM on the prompts the queries are placed in."""
    qformer: QFormerConfig = model.qformer
    llm: LLMConfig = model.llm
    train_q, q = not qformer.frozen, qformer.queries
    memory_grad = video_out_grad or train_q  # the memory passes the QFormer's video_norm
    grad = train_q  # the queries, through the trainable embed_norm
    for i in range(qformer.num_layers):
        crosses = i % qformer.cross_attention_every == 0
        # full recomputation checkpoints each layer with megatron-core's autograd Function (the
        # memory among its inputs): its output needs a gradient only if an input does
        in_graph = grad or memory_grad if t.recompute == "full" else True
        cost = _post_norm_layer(q, qformer, grad and in_graph, train_q and in_graph,
                                n if crosses else 0, model.student.hidden_size,
                                memory_grad and in_graph)
        t.layers("qformer", cost, samples)
        grad = in_graph and (grad or train_q or (crosses and memory_grad))
    t.add("qformer", _linear(q, qformer.hidden_size, llm.hidden_size, grad, train_q, megatron=False),
          samples)
    grad = grad or train_q or llm.tuning == "full"  # the prompt: word embeddings and queries
    layers, output = _llm(llm, grad)
    t.layers("llm", layers, samples)
    t.add("llm", output, samples)


def _llm(llm: LLMConfig, grad: bool) -> tuple[_Cost, _Cost]:
    """The decoder's layers and its output layer on ``max_length`` tokens."""
    s, h = llm.max_length, llm.hidden_size
    head_dim = h // llm.num_heads
    width, qkv = llm.num_heads * head_dim, (llm.num_heads + 2 * llm.num_kv_heads) * head_dim
    train, lora, r = llm.tuning == "full", llm.tuning == "lora", llm.lora_rank
    ffn = llm.mlp_hidden_size

    def adapter(n_in: int, parts: int, n_out: int, grad_in: bool, row: bool = False) -> _Cost:
        """LoRA's A (one per fused part) and B, in bf16; nothing without LoRA."""
        if not lora:
            return _Cost()
        return (_linear(s, n_in, parts * r, grad_in, True)
                + _linear(s, r, n_out, True, True, megatron=not row))

    total = _Cost()
    for _ in range(llm.num_layers):
        cost = _layer_linear(s, h, qkv, grad, train) + adapter(h, 3, qkv, grad)
        g = grad or train or lora
        cost += _attention(s, s, width, g, g)  # keys and values repeated to every query head
        cost += _layer_linear(s, width, h, g, train) + adapter(width, 1, h, g, row=True)
        cost += _layer_linear(s, h, 2 * ffn, g, train) + adapter(h, 2, 2 * ffn, g)
        cost += _layer_linear(s, ffn, h, g, train) + adapter(ffn, 1, h, g, row=True)
        total += cost
        grad = g
    head = _linear(s, h, llm.vocab_size, grad, train) + adapter(h, 1, llm.vocab_size, grad)
    return total, head


def _stage3(cfg: Config, t: _Tally, video: bool = True) -> None:
    """The video encoder, the QFormer and the LLM; a text-only step (not ``video``) the LLM
    alone, its prompt of words."""
    model, b = cfg.model, cfg.train.global_batch
    if not video:
        layers, output = _llm(model.llm, model.llm.tuning == "full")
        t.layers("llm", layers, b)
        t.add("llm", output, b)
        return
    tokens = _video_tokens(cfg)
    train_v = not model.video_frozen
    _video_encoder(t, "video", model.student, model.student.num_layers - 1, tokens,
                   cfg.parallel.encoder_tp_size, b, train_v)
    _qformer_and_llm(t, model, train_v, tokens.real, b)


def _qformer_layer(queries: float, text: float, q: QFormerConfig, grad: bool, train: bool,
                   memory: float = 0, memory_width: int = 0, memory_grad: bool = False) -> _Cost:
    """A QFormer layer on queries and text together: self-attention and the FFNs over both, the
    cross-attention for the queries alone."""
    tokens, h = queries + text, q.hidden_size
    cost = _post_norm_layer(tokens, q, grad, train)
    if memory:  # what the queries' cross-attention adds
        g, mg = grad or train, memory_grad or train
        cost += (_layer_linear(queries, h, h, g, train)
                 + _layer_linear(memory, memory_width, 2 * h, memory_grad, train)
                 + _attention(queries, memory, h, g, mg)
                 + _layer_linear(queries, h, h, g or mg, train))
    return cost


def _align(cfg: Config, t: _Tally, dp: int) -> None:
    """The align sub-stage: the video encoder, then the QFormer on the queries alone (VTC), the
    caption alone (VTC), queries and caption (VTM: 3 pairs per sample) and the caption after
    the queries (captioning), with their heads."""
    model, b = cfg.model, cfg.train.global_batch
    q, align, student = model.qformer, model.align, model.student
    tokens = _video_tokens(cfg)
    train_v = not model.video_frozen
    _video_encoder(t, "video", student, student.num_layers - 1, tokens, cfg.parallel.tp, b,
                   train_v)
    n, width, h, e = tokens.real, student.hidden_size, q.hidden_size, align.embed_dim
    queries, text = q.queries, q.max_text_length
    gathered = cfg.train.micro_batch * dp
    passes = [(1, queries, 0, align.vtc or align.vtm), (1, 0, text, align.vtc or align.vtm),
              (3, queries, text, align.vtm), (1, queries, text, align.cap)]
    for copies, nq, nt, used in passes:
        if not used:
            continue
        cost = sum((_qformer_layer(nq, nt, q, True, True, n if nq and i % q.cross_attention_every
                                   == 0 else 0, width, True) for i in range(q.num_layers)),
                   _Cost())
        t.layers("qformer", cost, b * copies)
    heads = _Cost()
    if align.vtc or align.vtm:
        vtc = bool(align.vtc)
        heads += _linear(queries, h, e, True, vtc) + _linear(1, h, e, True, vtc)
        heads += 2 * _mm(queries, e, gathered, vtc, vtc)
    if align.vtm:
        heads += 3 * _linear(1, 2 * h, 2, True, True, megatron=False)
    if align.cap:
        heads += (_linear(text, h, h, True, True, megatron=False)
                  + _linear(text, h, padded_vocab(len(QFormerText(q.vocab_file))), True, True))
    t.add("heads", heads, b)


def _fp8_shares(cfg: Config) -> dict[str, float]:
    """Per part, the share of its layers whose GEMMs run in FP8 (``train.precision=fp8``: every
    transformer's layers but its ``fp8.bf16_first_layers`` and ``bf16_last_layers``; the frozen
    teachers' only with ``fp8.teachers``)."""
    train, model = cfg.train, cfg.model
    if train.precision != "fp8":
        return {}
    kept = train.fp8.bf16_first_layers + train.fp8.bf16_last_layers
    encoders = {"student": model.student, "video": model.student}
    if cfg.stage == 1 and train.fp8.teachers:
        encoders |= {"clip_teacher": model.clip_teacher, "mae_teacher": model.mae_teacher}
    if cfg.stage == 2:
        encoders |= {"text": model.text, "audio": model.audio}
    if cfg.stage == 3:
        encoders |= {"qformer": model.qformer, "llm": model.llm}
    return {part: max(enc.num_layers - kept, 0) / enc.num_layers
            for part, enc in encoders.items()}


def step_flops(cfg: Config, dp: int = 1, video: bool = True) -> StepFlops:
    """The matmul FLOPs of one training step of ``cfg`` (all devices, the whole global batch).
    ``dp`` only sizes stage 2's similarity matrices (micro-batch x dp gathered rows); not
    ``video``: a stage-3 text-only step."""
    t = _Tally(cfg.train.recompute, _fp8_shares(cfg))
    if cfg.stage == 1:
        _stage1(cfg, t)
    elif cfg.stage == 2:
        _stage2(cfg, t, dp)
    elif cfg.model.substage == "align":
        _align(cfg, t, dp)
    else:
        _stage3(cfg, t, video)
    return t.flops


def video_tokens(cfg: Config) -> int:
    """Video-encoder tokens per step (real ones, no padding): sequence length x global batch."""
    return _video_tokens(cfg).real * cfg.train.global_batch


__all__ = ["StepFlops", "step_flops", "teacher_input", "video_tokens"]
