#!/usr/bin/env python
"""Start a megatron_unihetero checkpoint from HuggingFace weights, at any TP/PP.

    # a Llama LLM + a Dinov2 / SigLIP / CLIP vision encoder (projector and heads freshly initialised)
    python tools/convert_hf_to_checkpoint.py --llm hf/llama --vision hf/dinov2 --save ckpt \
        --tp 2 --pp 2 [--tokenizer PATH | --image-token-id N]
    # an exported Llava folder (tools/convert_checkpoint_to_hf.py) back to a checkpoint
    python tools/convert_hf_to_checkpoint.py --llm hf/exported --save ckpt --tp 1 --pp 2

Writes CKPT/iter_0000000/{config.yaml, model/} and CKPT/latest; train from it with
checkpoint.load=CKPT (or checkpoint.dir=CKPT to resume its iteration).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.config_io import ConfigLoadError  # noqa: E402
from megatron_unihetero.hf import ConversionError, import_hf  # noqa: E402
from megatron_unihetero.models.config import ConfigError, SemanticGenConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", required=True, help="LlamaForCausalLM folder, or an exported Llava folder")
    p.add_argument("--vision", default=None, help="Dinov2 / SigLIP / CLIP vision model folder")
    p.add_argument("--save", required=True, help="new checkpoint folder (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the checkpoint")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model or HF tokenizer folder")
    p.add_argument("--image-token-id", type=int, default=None,
                   help="the <image> token id (default: the tokenizer's)")
    p.add_argument("--semantic-weight", type=float, default=1.0,
                   help="semantic-generation loss weight; 0 builds no semantic head")
    p.add_argument("--semantic-head", default="linear", choices=["linear", "mlp"])
    p.add_argument("--semantic-target", default="input_embedding",
                   choices=["input_embedding", "ema_input_embedding", "encoder_output"])
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="default: the Llama config's max_position_embeddings")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh projector and head")
    args = p.parse_args(argv)
    try:
        semantic = SemanticGenConfig(weight=args.semantic_weight, head=args.semantic_head,
                                     target=args.semantic_target)
        import_hf(args.llm, args.save, vision=args.vision, tp=args.tp, pp=args.pp,
                  tokenizer=args.tokenizer, image_token_id=args.image_token_id, semantic=semantic,
                  seed=args.seed, max_sequence_length=args.max_sequence_length)
    except (ConversionError, ConfigError, ConfigLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
