#!/usr/bin/env python
"""Data pipeline throughput on the demo data (shapes world), CPU.

    python benchmarks/data_throughput.py [--num-rows 2000] [--seq-length 1024] [--tokens-per-image 16]

Prints:
  (a) loader samples/s reading preprocessed shards vs building samples from the raw parquet on
      the fly (tokenise + PIL decode + resize + normalise per sample, the work a loader without
      shards repeats every epoch; the baseline does no packing or collation, which flatters it);
  (b) packing efficiency (non-padding fraction of the packed rows) over one epoch;
  (c) preprocessing samples/s with one worker (tools/preprocess_data.py's pipeline).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from megatron_unihetero.data.blending import BlendedSampleStream  # noqa: E402
from megatron_unihetero.data.dataset import MultimodalDataset  # noqa: E402
from megatron_unihetero.data.demo_world import write_demo_data  # noqa: E402
from megatron_unihetero.data.image_transforms import ImageNormalizer  # noqa: E402
from megatron_unihetero.data.loader import MultimodalLoader  # noqa: E402
from megatron_unihetero.data.packing import WindowPacker  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--num-rows", type=int, default=2000, help="demo rows (the 'both' template makes 2 samples per row)")
    p.add_argument("--raw-image-size", type=int, default=64, help="size the demo images are rendered at")
    p.add_argument("--image-size", type=int, default=64, help="model image size (shards and baseline)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--tokens-per-image", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--pack-window", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2, help="loader epochs to time")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a training process leaves few to the loader)")
    return p.parse_args()


def prepare(args, root):
    """Demo parquet, a SentencePiece tokenizer, and shards; returns (parquet, prefix, preprocess summary)."""
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig
    from megatron_unihetero.data.preprocess.train_spm import train_sentencepiece

    write_demo_data(os.path.join(root, "demo"), args.num_rows, seed=0, image_size=args.raw_image_size, valid_fraction=0.0)
    parquet = os.path.join(root, "demo", "train.parquet")
    tok = os.path.join(root, "tok.model")
    train_sentencepiece([parquet], tok, 512, ["caption", "question", "answer"])
    cfg = PreprocessConfig(inputs=[parquet], output_prefix=os.path.join(root, "shards", "train"), tokenizer_model=tok,
                           sample=SampleConfig(image_size=args.image_size, template="both"), workers=1, progress=False)
    summary = run_preprocess(cfg)
    return parquet, tok, cfg.output_prefix, summary


def time_loader(args, dataset, prefetch):
    """(samples/s, loader stats) over ``args.epochs`` epochs of ``dataset``."""
    loader = MultimodalLoader(dataset, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                              tokens_per_image=args.tokens_per_image, num_samples=args.epochs * len(dataset),
                              pack_window=args.pack_window, prefetch=prefetch)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["num_documents"]
    seconds = time.perf_counter() - start
    loader.close()
    return samples / seconds, loader.stats


def time_raw_decode(args, parquet, tokenizer_path, num_samples):
    """Samples/s building samples from the parquet on the fly: per sample, tokenise its text and
    decode + resize + normalise its image (what a loader without shards repeats every epoch)."""
    from megatron_unihetero.data.preprocess.images import decode_image
    from megatron_unihetero.data.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_path)
    normalize = ImageNormalizer()
    start, done = time.perf_counter(), 0
    while done < num_samples:
        for record in pq.ParquetFile(parquet).iter_batches(batch_size=256, columns=["image", "caption", "question", "answer"]):
            for row in record.to_pylist():
                # Each row yields two samples (caption, QA), each carrying its own image.
                for text in (row["caption"], f"Question: {row['question']} Answer: {row['answer']}"):
                    tok.encode(text)
                    normalize(decode_image(row["image"], args.image_size)[None])
                    done += 1
                if done >= num_samples:
                    break
            if done >= num_samples:
                break
    return done / (time.perf_counter() - start)


def packing_efficiency(args, dataset, seq_length):
    """(non-padding fraction, rows) of one epoch packed into rows of ``seq_length`` (no collation)."""
    stream = BlendedSampleStream([dataset], seed=0, tokens_per_image=args.tokens_per_image, num_samples=len(dataset))
    packer = WindowPacker(seq_length, seed=0)
    window = 0
    while True:
        refs = stream.take(args.pack_window)
        if not refs:
            return packer.stats.efficiency, packer.stats.rows
        for row in packer.pack(refs, window):
            packer.count_emitted(row)
        window += 1


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        t0 = time.perf_counter()
        parquet, tokenizer_path, prefix, summary = prepare(args, root)
        dataset = MultimodalDataset(prefix)
        print(f"demo data: {args.num_rows} rows -> {len(dataset)} samples, raw images {args.raw_image_size}px, "
              f"model images {args.image_size}px, seq_length {args.seq_length}, tokens_per_image "
              f"{args.tokens_per_image}, torch threads {args.threads} (prepared in {time.perf_counter() - t0:.1f}s)")

        shard_rate, stats = time_loader(args, dataset, prefetch=0)
        prefetch_rate, _ = time_loader(args, dataset, prefetch=2)
        raw_rate = time_raw_decode(args, parquet, tokenizer_path, min(len(dataset), 4000))
        print(f"(a) loader from shards: {shard_rate:,.0f} samples/s (prefetch thread: {prefetch_rate:,.0f}); "
              f"on the fly from parquet (tokenise + decode + resize + normalise): {raw_rate:,.0f} samples/s; "
              f"speed-up {shard_rate / raw_rate:.1f}x (target >= 10x)")
        print(f"(b) packing efficiency: {100 * stats['efficiency']:.2f}% non-padding over {stats['rows']} rows of "
              f"{args.seq_length} (window {args.pack_window}; rejected {stats['rejected_samples']}) (target >= 95%)")
        for seq in (256, 512, 2048):
            if seq != args.seq_length:
                eff, rows = packing_efficiency(args, dataset, seq)
                print(f"    seq_length {seq}: {100 * eff:.2f}% over {rows} rows")
        print(f"(c) preprocessing: {summary['samples_per_s']:,.1f} samples/s with 1 worker "
              f"({summary['samples']} samples in {summary['seconds']:.1f}s, includes worker start-up)")


if __name__ == "__main__":
    main()
