"""Official InternVideo2 weights <-> MegaVideo checkpoints.

    python -m launch.convert import CONFIG --out DIR [--student F] [--clip-teacher F]
                             [--mae-teacher F] [--strip KIND=PREFIX ...] [--ignore PREFIX ...]
    python -m launch.convert import STAGE2_CONFIG --out DIR --stage2 F
    python -m launch.convert export CONFIG --checkpoint DIR --out DIR
    python -m launch.convert export STAGE3_CONFIG --checkpoint DIR --out DIR --layout internvideo2-chat

For a stage-2 config, ``import --stage2`` reads a released InternVideo2 stage-2 checkpoint (video
encoder, projections, BERT, BEATs, matching heads, temperature) into a checkpoint root that any
layout loads or evaluates, and ``export`` writes ``stage2.pth`` with the official keys.

For a stage-3 config, ``export`` writes the LLM decoder in the Hugging Face Mistral layout
(``model.safetensors`` and ``config.json``, ``--dtype`` bfloat16 by default); its import is
``model.llm.weights=<folder>`` at start-up, straight into the TP/PP shards. ``--layout
internvideo2-chat`` writes the whole model (video encoder, QFormer, LLM with LoRA unmerged) as
the released InternVideo2-Chat-8B names it; its import is ``model.weights=<file>``.

``import`` reads official PyTorch checkpoints (a state dict, or one under ``module``/``model``/
``state_dict``) and writes a checkpoint root that any layout loads (``checkpoint.load=DIR``):
the student as ``step_00000000``, the teachers as ``teachers/``. ``export`` writes
``student.pth``, ``clip_teacher.pth`` and ``mae_teacher.pth`` with the official keys. The
VideoMAEv2 pre-training file keeps the encoder under ``encoder.``: ``--strip mae_teacher=encoder.
--ignore decoder. --ignore encoder_to_decoder --ignore mask_token``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.common import config_or_exit, exit_with, setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=("import", "export"))
    parser.add_argument("config", help="run config naming the model, e.g. configs/stage1_vit6b.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, help="checkpoint root (import) or folder (export)")
    parser.add_argument("--student")
    parser.add_argument("--clip-teacher")
    parser.add_argument("--mae-teacher")
    parser.add_argument("--stage2", help="stage 2: a released InternVideo2 stage-2 checkpoint")
    parser.add_argument("--strip", action="append", default=[], metavar="KIND=PREFIX")
    parser.add_argument("--ignore", action="append", default=[], metavar="PREFIX")
    parser.add_argument("--checkpoint", help="MegaVideo checkpoint root to export")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="stage 3: the exported tensors' dtype")
    parser.add_argument("--layout", choices=("mistral", "internvideo2-chat"), default="mistral",
                        help="stage 3: the LLM as Mistral (LoRA merged), or the whole model as "
                             "the released InternVideo2-Chat files (LoRA unmerged)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_or_exit(args.config, args.overrides)
    import torch

    from megavideo.weights.files import load_state_dict
    from megavideo.weights.internvideo2 import (
        KINDS,
        KeyMismatch,
        from_official,
        read_checkpoint,
        strip_keys,
        to_official,
        write_checkpoint,
    )

    try:
        if cfg.stage == 2:
            _stage2(args, cfg)
            return
        if args.direction == "import":
            strips = dict(s.split("=", 1) for s in args.strip)
            files = {k: getattr(args, k) for k in KINDS if getattr(args, k)}
            if not files:
                raise ValueError("give at least one of --student, --clip-teacher, --mae-teacher.")
            states = {}
            for kind, path in files.items():
                official = strip_keys(load_state_dict(path)[0], strips.get(kind, ""), tuple(args.ignore))
                states[kind] = from_official(kind, cfg.model, official)
            write_checkpoint(cfg, states, Path(args.out))
            print(f"wrote {args.out} ({', '.join(states)})")
        else:
            if not args.checkpoint:
                raise ValueError("export needs --checkpoint DIR.")
            out = Path(args.out)
            if cfg.stage == 3 and args.layout == "internvideo2-chat":
                from megavideo.weights.internvideo2 import read_stage3
                from megavideo.weights.qformer import text_vocab
                from megavideo.weights.videochat2 import write_chat

                path = write_chat(read_stage3(cfg, Path(args.checkpoint)), cfg,
                                  text_vocab(cfg.model), out, getattr(torch, args.dtype))
                print(f"wrote {path}")
                return
            if cfg.stage == 3:
                from megavideo.weights.hf_llm import write_hf
                from megavideo.weights.internvideo2 import read_llm

                write_hf(read_llm(cfg, Path(args.checkpoint)), cfg.model.llm, out,
                         getattr(torch, args.dtype))
                print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
                return
            out.mkdir(parents=True, exist_ok=True)
            for kind, state in read_checkpoint(cfg, Path(args.checkpoint)).items():
                torch.save(to_official(kind, cfg.model, state), out / f"{kind}.pth")
                print(f"wrote {out / f'{kind}.pth'}")
    except (KeyMismatch, ValueError) as err:
        exit_with(err)
    except KeyError as err:  # a tensor without a counterpart in the other layout
        exit_with(ValueError(f"{err.args[0]}."))


def _stage2(args, cfg) -> None:
    """A released stage-2 checkpoint in (``--stage2``) or out (``stage2.pth``)."""
    import torch

    from dataloaders.tokenizer import WordPiece
    from megavideo.weights import stage2
    from megavideo.weights.files import load_state_dict
    from megavideo.weights.internvideo2 import meta_params, read_checkpoint, write_checkpoint
    from parallel.distributed import single_rank_world

    vocab = len(WordPiece.from_file(cfg.model.text.vocab_file))
    if args.direction == "export":
        if not args.checkpoint:
            raise ValueError("export needs --checkpoint DIR.")
        state = read_checkpoint(cfg, Path(args.checkpoint))["student"]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(stage2.to_official(cfg.model, state, vocab), out / "stage2.pth")
        print(f"wrote {out / 'stage2.pth'}")
        return
    if not args.stage2:
        raise ValueError("a stage-2 config imports --stage2 FILE (a released stage-2 checkpoint).")
    with single_rank_world():
        names = list(meta_params(cfg)["student"])
    official = load_state_dict(args.stage2)[0]
    write_checkpoint(cfg, {"student": stage2.from_official(cfg.model, official, names, vocab)},
                     Path(args.out))
    print(f"wrote {args.out} (the stage-2 model)")


if __name__ == "__main__":
    main()
