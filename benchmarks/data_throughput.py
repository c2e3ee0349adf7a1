#!/usr/bin/env python
"""Data pipeline throughput on the demo data (shapes world), CPU.

    python benchmarks/data_throughput.py [--num-rows 2000] [--seq-length 1024] [--tokens-per-image 16]

Prints:
  (a) loader samples/s reading preprocessed shards vs building samples from the raw parquet on
      the fly (tokenise + PIL decode + resize + normalise per sample, the work a loader without
      shards repeats every epoch; the baseline does no packing or collation, which flatters it);
  (b) packing efficiency (non-padding fraction of the packed rows) over one epoch;
  (c) preprocessing samples/s with one worker (tools/preprocess_data.py's pipeline);
  (d)-(g) at the paper's image size (224 px JPEG input, photo-like synthetic images):
      preprocessing samples/s per core (source kept, and re-encoded from 320 px), bytes per
      image on disk (encoded vs pixels), loader samples/s with 0, 1 and 2 workers (decode +
      normalise at 224 px, seq 4096, 256 tokens per image), beside the samples/s one H100
      consumes at the paper's setting (examples/configs/paper_7b.yaml: 7B + DINOv2-L at
      45% MFU, training/flops.py).

    python benchmarks/data_throughput.py --paper-scale-only [--jpeg-rows 400]
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
    p.add_argument("--paper-scale-only", action="store_true", help="only (d)-(g)")
    p.add_argument("--jpeg-rows", type=int, default=400, help="rows of the 224 px JPEG input for (d)-(g)")
    p.add_argument("--mfu", type=float, default=0.45)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    p.add_argument("--cores-per-gpu", type=int, default=14,
                   help="assumption: a DGX H100 has 112 cores for 8 GPUs")
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


def photo_like(rng, size):
    """A synthetic stand-in for a photo: smooth colour fields, edges and fine texture (JPEG
    sizes of flat demo shapes would flatter the encoded store; pure noise would not compress)."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] += rng.uniform(10, 40) * np.sin(2 * np.pi * (fx * x + fy * y) + ph)
        img[..., c] += rng.uniform(60, 190)
    for _ in range(6):  # objects with hard edges
        cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.25)]
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)  # sensor-like texture
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_parquet(path, rows, size, seed=0):
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng, size)).save(buf, format="JPEG", quality=90)
        records.append({"image": buf.getvalue(), "caption": f"a photo of object {i} on a table, seen from the left "
                                                           f"side with some trees behind it and a blue sky"})
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=64)


def paper_gpu_rate(args, tokens_per_sample=320, seq_length=4096):
    """Samples/s one GPU consumes: 7B + DINOv2-L (224 px, 256 tokens) at ``args.mfu``, from
    training/flops.py on a packed row of ~12.8 pairs of ``tokens_per_sample`` positions."""
    import yaml

    from megatron_unihetero import config_io
    from megatron_unihetero.models.config import ModelConfig
    from megatron_unihetero.training.flops import flop_terms, step_flops

    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "paper_7b.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    # The yaml points at a local DINOv2-L folder; its architecture (at 224 px) is all flops.py needs.
    model["vision"] = {**model["vision"], "path": None,
                       "hf_config": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         intermediate_size=4096, image_size=224, patch_size=14)}
    cfg = config_io.from_dict(ModelConfig, model, "model")
    docs = seq_length // tokens_per_sample
    tokens = torch.full((1, seq_length), 100)
    segments = torch.full((1, seq_length), -1, dtype=torch.int32)
    for d in range(docs):
        lo = d * tokens_per_sample
        segments[0, lo:lo + tokens_per_sample] = d
        tokens[0, lo + 2:lo + 2 + 256] = cfg.image_token_id
    batch = {"tokens": tokens, "segment_ids": segments, "images": torch.zeros(docs, 3, 224, 224)}
    per_sample = step_flops(cfg, batch, **flop_terms(cfg)) / docs
    return args.mfu * args.peak_tflops * 1e12 / per_sample, per_sample


def paper_scale(args, root):
    """(d)-(g): see the module docstring."""
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig
    from megatron_unihetero.data.shards import _indexed_dataset_module

    _indexed_dataset_module()
    tok = train_tiny_tokenizer(root)
    src = {}
    for size in (224, 320):
        src[size] = os.path.join(root, f"jpeg{size}.parquet")
        jpeg_parquet(src[size], args.jpeg_rows, size)
    results = {}
    for name, size, store in (("kept", 224, "encoded"), ("reencoded", 320, "encoded"), ("pixels", 224, "pixels")):
        cfg = PreprocessConfig(inputs=[src[size]], output_prefix=os.path.join(root, name, "ds"), tokenizer_model=tok,
                               sample=SampleConfig(image_size=224), image_store=store, workers=1, progress=False)
        s = run_preprocess(cfg)
        disk = sum(os.path.getsize(os.path.join(root, name, f)) for f in os.listdir(os.path.join(root, name))
                   if ".images." in f or ".encoded." in f)
        results[name] = (s, cfg.output_prefix, disk / s["images"])
    print(f"(d) preprocessing at 224 px, 1 worker = 1 core: {results['kept'][0]['samples_per_s']:.0f} samples/s "
          f"(224 px JPEG sources kept: full decode check only), {results['reencoded'][0]['samples_per_s']:.0f} "
          f"samples/s (320 px JPEG: decode + resize + JPEG q90 re-encode), "
          f"{results['pixels'][0]['samples_per_s']:.0f} samples/s (pixels store)")
    enc, pix = results["kept"][2], results["pixels"][2]
    print(f"(e) bytes per image on disk: encoded {enc / 1024:.1f} KiB (JPEG q90 source kept; re-encoded from 320 px: "
          f"{results['reencoded'][2] / 1024:.1f} KiB), pixels {pix / 1024:.1f} KiB: {pix / enc:.1f}x smaller; "
          f"80M pairs: {80e6 * enc / 1e12:.1f} TB encoded vs {80e6 * pix / 1e12:.1f} TB pixels")
    dataset = MultimodalDataset(results["kept"][1])
    rates, per_core = {}, {}
    for workers in (0, 1, 2):
        loader = MultimodalLoader(dataset, seq_length=4096, micro_batch_size=1, tokens_per_image=256,
                                  num_samples=3 * len(dataset), pack_window=512, prefetch=2, num_workers=workers)
        before = os.times()
        start, samples = time.perf_counter(), 0
        for batch in loader:
            samples += batch["num_documents"]
        rates[workers] = samples / (time.perf_counter() - start)  # includes worker start-up
        loader.close()  # joins the workers: their CPU time is then in os.times()'s children
        after = os.times()
        if workers:  # CPU seconds of the workers (reading, decoding, collating), whatever the load
            cpu = after.children_user + after.children_system - before.children_user - before.children_system
        else:
            cpu = after.user + after.system - before.user - before.system
        per_core[workers] = samples / max(cpu, 1e-9)
    pixel_rate = time_loader_on(MultimodalDataset(results["pixels"][1]))
    print(f"(f) loader at 224 px (decode + normalise + pack into 4096-token rows), wall clock: "
          + ", ".join(f"{w} workers {r:,.0f} samples/s" for w, r in rates.items())
          + f" (pixels store, 0 workers: {pixel_rate:,.0f} samples/s); per CPU-second of the process(es) doing "
          f"the work: " + ", ".join(f"{w} workers {r:,.0f}" for w, r in per_core.items())
          + f"; cpus here: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    gpu, per_sample = paper_gpu_rate(args)
    per_worker = max(per_core[1], 1e-9)
    print(f"(g) one H100 at the paper's setting (7B + DINOv2-L/14 at 224 px, {100 * args.mfu:.0f}% MFU of "
          f"{args.peak_tflops:.0f} TFLOP/s, {per_sample / 1e12:.1f} TFLOP per pair of ~320 positions) consumes "
          f"{gpu:,.0f} samples/s; at {per_worker:,.0f} samples/s per worker core that is {gpu / per_worker:.2f} worker "
          f"cores per GPU, of the {args.cores_per_gpu} cores per GPU assumed (--cores-per-gpu; DGX H100: 112 / 8)")


def time_loader_on(dataset):
    loader = MultimodalLoader(dataset, seq_length=4096, micro_batch_size=1, tokens_per_image=256,
                              num_samples=2 * len(dataset), pack_window=512, prefetch=0)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["num_documents"]
    return samples / (time.perf_counter() - start)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.paper_scale_only:
        with tempfile.TemporaryDirectory() as tmp:
            paper_scale(args, args.workdir or tmp)
        return
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
        paper_scale(args, os.path.join(root, "paper"))


if __name__ == "__main__":
    main()
