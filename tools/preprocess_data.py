#!/usr/bin/env python
"""Preprocess image-text data into indexed shards (format: megatron_unihetero/data/shards.py).

    python tools/preprocess_data.py --input data/shapes/train.parquet --output-prefix data/shapes/train \\
        --tokenizer-model data/shapes/tokenizer.model --template both --workers 2

    # LLaVA conversations (JSON array or JSONL), images under --image-root, loss on the answers:
    python tools/preprocess_data.py --input llava_v1_5_mix665k.json --input-format llava \
        --image-root /data/llava/images --output-prefix shards/instruct --tokenizer-model tok.model \
        --image-size 224

    # job I of K (e.g. a SLURM array, examples/launch/preprocess_array.sbatch), then join:
    python tools/preprocess_data.py ... --num-shards 4 --shard-index $I      (writes PREFIX.partI-of-K)
    python tools/merge_shards.py --input PREFIX --num-parts 4 --output-prefix PREFIX_all

Images are stored encoded by default (--image-store encoded): the source file itself when it
already is --image-size square in the target format, else re-encoded (--image-format auto:
JPEG sources as JPEG at --jpeg-quality, others as lossless PNG). Bad rows are skipped and
listed in PREFIX.rejects.jsonl; the exit code is 1 only when the rejected fraction exceeds
--max-reject-fraction. The libraries' warnings go to PREFIX.log (--verbose: the console too).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.preprocess.images import (  # noqa: E402
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_FORMATS,
    ImageLimits,
)
from megatron_unihetero.data.preprocess.pipeline import (IMAGE_STORES, SPLIT_BY, PreprocessConfig,  # noqa: E402
                                                         format_summary, run_preprocess)
from megatron_unihetero.data.preprocess.readers import FORMATS, UTF8_ERRORS  # noqa: E402
from megatron_unihetero.data.preprocess.samples import TEMPLATES, SampleConfig  # noqa: E402

_VERBOSE = argparse.ArgumentParser(add_help=False)
_VERBOSE.add_argument("--verbose", action="store_true")


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="parquet, jsonl(.gz), webdataset .tar or LLaVA .json/.jsonl files")
    p.add_argument("--output-prefix", required=True, help="shards are PREFIX_00000, PREFIX_00001, ...")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or local HF tokenizer folder")
    p.add_argument("--input-format", choices=FORMATS, help="default: from the extension (.json: llava)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64, help="rows per worker task")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="caption: image + text (default; for llava records: images + the reply); qa: image + "
                        "question/answer (loss on the answer); both: one of each per row; interleaved: "
                        "--interleaved-column segments; conversation: llava records, loss on the assistant turns "
                        "(the default for --input-format llava)")
    p.add_argument("--image-store", choices=IMAGE_STORES[:2], default="encoded",
                   help="encoded: image files (JPEG/PNG/WebP) at --image-size, decoded by the loader's workers; "
                        "pixels: raw RGB (150 KB per 224 px image)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="auto",
                   help="format of re-encoded images: auto (JPEG sources -> JPEG, others -> PNG), jpeg, png, "
                        "webp (lossless)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--conversation-column", default="conversations")
    p.add_argument("--text-column", default="caption")
    p.add_argument("--image-column", default="image")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--interleaved-column", default=None,
                   help="column with a list of {'text': ...}/{'image': ...} segments (implies --template interleaved)")
    p.add_argument("--image-root", "--image-path-root", dest="image_root", default=None,
                   help="folder that image paths in the data are resolved against and must stay "
                        "inside ('..', absolute paths and links out of it are rejects)")
    p.add_argument("--allow-paths-outside-root", action="store_true",
                   help="trusted data only: read image paths outside --image-root (or, without "
                        "one, relative to the working directory)")
    p.add_argument("--min-image-size", type=int, default=ImageLimits.min_size,
                   help="a source image with a side under this many pixels is a reject")
    p.add_argument("--max-aspect-ratio", type=float, default=ImageLimits.max_aspect_ratio,
                   help="a source image whose longer side is more than this times its shorter one "
                        "is a reject")
    p.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels,
                   help="a source image of more pixels is a reject, read from its header before "
                        "it is decoded (keeps a worker's decode near 1 GB)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="an image file (or inline image) larger than this is a reject "
                        f"(default {DEFAULT_MAX_IMAGE_BYTES >> 20} MiB)")
    p.add_argument("--max-text-tokens", type=int, default=None, help="reject rows with more text tokens")
    p.add_argument("--shard-size-mb", type=float, default=1024.0)
    p.add_argument("--max-reject-fraction", type=float, default=0.01)
    p.add_argument("--precompute-features", action="store_true", help="store frozen encoder features, not pixels")
    p.add_argument("--vision-model", default=None, help="local HF vision model folder (Dinov2, CLIP, SigLIP)")
    p.add_argument("--num-shards", type=int, default=1, help="split the run into K independent jobs ...")
    p.add_argument("--shard-index", type=int, default=0, help="... of which this is job I (0-based)")
    p.add_argument("--split-by", choices=SPLIT_BY, default="auto",
                   help="split the jobs by input files or by rows (auto: files when there are >= K files)")
    p.add_argument("--invalid-utf8", choices=UTF8_ERRORS, default="reject",
                   help="text that is not UTF-8: reject the line/sample naming it (default), or replace "
                        "the bad bytes with U+FFFD")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="print the libraries' warnings on the console too (they go to PREFIX.log)")
    a = p.parse_args(argv)
    if a.precompute_features and not a.vision_model:
        p.error("--precompute-features needs --vision-model LOCAL_DIR")
    if not 0 <= a.shard_index < a.num_shards:
        p.error(f"--shard-index must be in [0, --num-shards={a.num_shards}), got {a.shard_index}")
    template = a.template or ("conversation" if a.input_format == "llava" else "caption")
    template = "interleaved" if a.interleaved_column else template
    sample = SampleConfig(
        template=template, text_column=a.text_column, image_column=a.image_column,
        question_column=a.question_column, answer_column=a.answer_column,
        interleaved_column=a.interleaved_column or "segments", conversation_column=a.conversation_column,
        image_path_root=a.image_root, allow_paths_outside_root=a.allow_paths_outside_root,
        max_image_bytes=a.max_image_bytes, min_image_size=a.min_image_size,
        max_aspect_ratio=a.max_aspect_ratio, max_image_pixels=a.max_image_pixels,
        image_size=a.image_size, max_text_tokens=a.max_text_tokens,
        image_format=a.image_format, jpeg_quality=a.jpeg_quality,
    )
    return PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model, sample=sample,
        input_format=a.input_format, workers=a.workers, chunk_size=a.chunk_size, shard_size_mb=a.shard_size_mb,
        max_reject_fraction=a.max_reject_fraction,
        vision_model=a.vision_model if a.precompute_features else None, progress=not a.no_progress,
        image_store="features" if a.precompute_features else a.image_store,
        num_shards=a.num_shards, shard_index=a.shard_index, split_by=a.split_by, invalid_utf8=a.invalid_utf8,
    )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    verbose = _VERBOSE.parse_known_args(argv)[0].verbose  # parse_args declares it for --help
    # The libraries' warnings (megatron-core's, at its import for the shard writer) go to
    # PREFIX.log beside PREFIX.rejects.jsonl, not the console; --verbose prints them too.
    from megatron_unihetero import console

    with console.RunLog() as log:
        log.open(cfg.job_prefix + ".log", verbose=verbose)
        try:
            summary = run_preprocess(cfg)
        except (ValueError, FileNotFoundError) as exc:  # an input that cannot be read at all
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(format_summary(summary, cfg.max_reject_fraction))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
