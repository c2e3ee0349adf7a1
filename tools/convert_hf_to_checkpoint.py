#!/usr/bin/env python
"""Start a megatron_unihetero checkpoint from HuggingFace weights (any TP/PP/DP loads it).

    # a Llama-2/3.x or Qwen2/2.5 LLM + a Dinov2 (with registers) / SigLIP / SigLIP2 / CLIP
    # vision encoder (projector and heads freshly initialised); the tokenizer is the LLM
    # folder's own unless given (one without a BOS token, as Qwen2's, gives documents
    # without BOS: model.documents_start_with_bos false)
    python tools/convert_hf_to_checkpoint.py --llm hf/llama --vision hf/dinov2 --save ckpt \
        [--image-size 224] [--vocab-divisible-by 1024] [--tokenizer PATH | --image-token-id N]
    # an exported Llava folder (tools/convert_checkpoint_to_hf.py) back to a checkpoint
    python tools/convert_hf_to_checkpoint.py --llm hf/exported --save ckpt

The tokenizer's special tokens the LLM lacks (<image>, <image_start>, <image_end>, <pad>) are
appended; the embedding and LM head grow to hold them (new rows: transformers'
resize_token_embeddings, mean init) and are padded to a multiple of --vocab-divisible-by.
Writes CKPT/iter_0000000/{config.yaml, dist/, manifest.json} and CKPT/latest, then prints the
settings a training config needs to train from it (checkpoint.load=CKPT, at any layout).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.config_io import ConfigLoadError  # noqa: E402
from megatron_unihetero.hf import ConversionError, import_hf  # noqa: E402
from megatron_unihetero.hf.importer import DEFAULT_VOCAB_DIVISIBLE_BY, training_settings  # noqa: E402
from megatron_unihetero.models.config import ConfigError, SemanticGenConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", required=True, help="LlamaForCausalLM or Qwen2ForCausalLM folder, or an exported Llava folder")
    p.add_argument("--vision", default=None,
                   help="Dinov2 / Dinov2WithRegisters / SigLIP / CLIP vision model folder")
    p.add_argument("--save", required=True, help="new checkpoint folder (must not exist or be empty)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model or HF tokenizer folder (default: the --llm folder's "
                        "tokenizer.model, else its tokenizer.json)")
    p.add_argument("--image-token-id", type=int, default=None,
                   help="the <image> token id (default: the tokenizer's)")
    p.add_argument("--vocab-divisible-by", type=int, default=DEFAULT_VOCAB_DIVISIBLE_BY,
                   help="pad the vocabulary to a multiple of this (default 128 x 8: every TP "
                        "size up to 8 divides it)")
    p.add_argument("--image-size", type=int, default=None,
                   help="run the vision encoder at this many pixels (position embeddings "
                        "interpolated; default: its config's image_size)")
    p.add_argument("--semantic-weight", type=float, default=1.0,
                   help="semantic-generation loss weight; 0 builds no semantic head")
    p.add_argument("--semantic-head", default="linear", choices=["linear", "mlp"])
    p.add_argument("--semantic-target", default="input_embedding",
                   choices=["input_embedding", "ema_input_embedding", "encoder_output"])
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="default: the Llama config's max_position_embeddings")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh projector, head and rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        semantic = SemanticGenConfig(weight=args.semantic_weight, head=args.semantic_head,
                                     target=args.semantic_target)
        import_hf(args.llm, args.save, vision=args.vision,
                  tokenizer=args.tokenizer, image_token_id=args.image_token_id, semantic=semantic,
                  seed=args.seed, max_sequence_length=args.max_sequence_length,
                  vocab_divisible_by=args.vocab_divisible_by, image_size=args.image_size)
    except (ConversionError, ConfigError, ConfigLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}; train from it with --checkpoint.load={os.path.abspath(args.save)} and:")
    for key, value in training_settings(args.save).items():
        if value is not None:
            print(f"  --{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
