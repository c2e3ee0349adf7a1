#!/usr/bin/env python
"""Train a SentencePiece tokenizer (byte fallback, image special tokens) on parquet/jsonl text.

    python tools/train_tokenizer.py --input data/shapes/train.parquet --vocab-size 512 \\
        --output data/shapes/tokenizer.model --text-columns caption,question,answer
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.preprocess.train_spm import train_sentencepiece  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="parquet, jsonl or jsonl.gz files")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--output", required=True, help="output PATH.model (PATH.vocab is written too)")
    p.add_argument("--text-columns", default="caption,question,answer", help="comma-separated text columns")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="stop reading after this many strings")
    args = p.parse_args(argv)
    info = train_sentencepiece(args.input, args.output, args.vocab_size, args.text_columns.split(","),
                               model_type=args.model_type, max_sentences=args.max_sentences)
    print(f"trained {args.output}: vocab {info['vocab_size']} from {info['num_sentences']} strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
