#!/usr/bin/env python
"""Preprocess image-text data into indexed shards (format: megatron_unihetero/data/shards.py).

    python tools/preprocess_data.py --input data/shapes/train.parquet --output-prefix data/shapes/train \\
        --tokenizer-model data/shapes/tokenizer.model --template both --workers 2

Bad rows are skipped and listed in PREFIX.rejects.jsonl; the exit code is 1 only when the
rejected fraction exceeds --max-reject-fraction.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, format_summary, run_preprocess  # noqa: E402
from megatron_unihetero.data.preprocess.samples import TEMPLATES, SampleConfig  # noqa: E402


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="parquet, jsonl(.gz) or webdataset .tar files")
    p.add_argument("--output-prefix", required=True, help="shards are PREFIX_00000, PREFIX_00001, ...")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or local HF tokenizer folder")
    p.add_argument("--input-format", choices=["parquet", "jsonl", "webdataset"], help="default: from the extension")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64, help="rows per worker task")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--template", choices=TEMPLATES, default="caption",
                   help="caption: image + text; qa: image + question/answer (loss on the answer); "
                        "both: one of each per row; interleaved: --interleaved-column segments")
    p.add_argument("--text-column", default="caption")
    p.add_argument("--image-column", default="image")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--interleaved-column", default=None,
                   help="column with a list of {'text': ...}/{'image': ...} segments (implies --template interleaved)")
    p.add_argument("--image-path-root", default=None, help="folder that relative image paths are resolved against")
    p.add_argument("--max-text-tokens", type=int, default=None, help="reject rows with more text tokens")
    p.add_argument("--shard-size-mb", type=float, default=1024.0)
    p.add_argument("--max-reject-fraction", type=float, default=0.01)
    p.add_argument("--precompute-features", action="store_true", help="store frozen encoder features, not pixels")
    p.add_argument("--vision-model", default=None, help="local HF vision model folder (Dinov2, CLIP, SigLIP)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.precompute_features and not a.vision_model:
        p.error("--precompute-features needs --vision-model LOCAL_DIR")
    template = "interleaved" if a.interleaved_column else a.template
    sample = SampleConfig(
        template=template, text_column=a.text_column, image_column=a.image_column,
        question_column=a.question_column, answer_column=a.answer_column,
        interleaved_column=a.interleaved_column or "segments", image_path_root=a.image_path_root,
        image_size=a.image_size, max_text_tokens=a.max_text_tokens,
    )
    return PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model, sample=sample,
        input_format=a.input_format, workers=a.workers, chunk_size=a.chunk_size, shard_size_mb=a.shard_size_mb,
        max_reject_fraction=a.max_reject_fraction,
        vision_model=a.vision_model if a.precompute_features else None, progress=not a.no_progress,
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    summary = run_preprocess(cfg)
    print(format_summary(summary, cfg.max_reject_fraction))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
