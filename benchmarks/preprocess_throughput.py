#!/usr/bin/env python
"""Preprocessing throughput on demo data: samples/s (and per worker) for 1 and 2 workers.

    python benchmarks/preprocess_throughput.py [--num-samples 2000] [--image-size 64] [--template both]

The time covers the whole run_preprocess call (worker start-up included), with megatron.core
imported beforehand so its one-off import (~5 s) is not counted. Imports stay inside main():
spawned workers re-execute this file's top level.

Bounded memory (``--rss``): preprocessing's peak RSS for N and 10 N rows of each input kind
(jsonl with image paths, parquet with image bytes, webdataset tar, LLaVA JSON array with
image paths), each run in a fresh process (peak RSS from ``os.wait4``), 1 worker:

    python benchmarks/preprocess_throughput.py --rss [--rss-rows 1000]
"""

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_unihetero.data import shards
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64, help="preprocessed image side")
    p.add_argument("--source-size", type=int, default=None,
                   help="side of the rendered demo images (default: --image-size); larger = more decode/resize work")
    p.add_argument("--template", default="both", choices=["caption", "qa", "both"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="best of N runs per worker count")
    p.add_argument("--rss", action="store_true", help="measure peak RSS at N and 10 N rows instead")
    p.add_argument("--rss-rows", type=int, default=1000, help="N for --rss")
    p.add_argument("--rss-child", nargs=5, metavar=("INPUT", "FORMAT", "PREFIX", "TOKENIZER", "IMAGE_ROOT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return rss_child(*args.rss_child)
    if args.rss:
        return rss_benchmark(args.rss_rows)

    shards._indexed_dataset_module()  # pay the megatron.core import before timing
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source_size or args.image_size
        write_demo_data(os.path.join(tmp, "demo"), args.num_samples, seed=0, image_size=source, valid_fraction=0.0)
        tok = train_tiny_tokenizer(tmp)
        print(f"demo data: {args.num_samples} rows, {source}px -> {args.image_size}px, template={args.template}, "
              f"cpus={os.cpu_count()}")
        for w in args.workers:
            best = None
            for rep in range(args.repeats):
                cfg = PreprocessConfig(
                    inputs=[os.path.join(tmp, "demo", "train.parquet")], output_prefix=os.path.join(tmp, f"out{w}", "ds"),
                    tokenizer_model=tok, sample=SampleConfig(template=args.template, image_size=args.image_size),
                    workers=w, progress=False,
                )
                t0 = time.time()
                s = run_preprocess(cfg)
                dt = time.time() - t0
                best = dt if best is None else min(best, dt)
            rate = s["samples"] / best
            print(f"workers={w}: {s['samples']} samples in {best:.2f}s -> {rate:.0f} samples/s, {rate / w:.0f} samples/s/worker")
    return 0


def rss_child(path, fmt, prefix, tokenizer, image_root) -> int:
    """One preprocessing run (the process whose peak RSS the parent reads)."""
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig

    template = "conversation" if fmt == "llava" else "caption"
    cfg = PreprocessConfig(inputs=[path], input_format=fmt, output_prefix=prefix, tokenizer_model=tokenizer,
                           sample=SampleConfig(template=template, image_size=64, image_path_root=image_root),
                           workers=1, progress=False, shard_size_mb=64)
    s = run_preprocess(cfg)
    print(json.dumps({"rows": s["rows"], "samples": s["samples"], "seconds": s["seconds"]}))
    return 0


def write_inputs(folder, rows):
    """The four input kinds with ``rows`` rows each (80 px JPEGs -> 64 px shards)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from megatron_unihetero.data.preprocess.fixtures import write_webdataset

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images", "a", "b"), exist_ok=True)
    pool = []  # 50 distinct images, reused (generation is not what is measured)
    for i in range(50):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    for i in range(rows):
        with open(os.path.join(folder, "images", "a", "b", f"{i}.jpg"), "wb") as f:
            f.write(pool[i % 50])
    caption = "a photo of a red circle above a blue square on a white table, number {}"
    paths = {}
    paths["jsonl"] = os.path.join(folder, "pairs.jsonl")
    with open(paths["jsonl"], "w") as f:
        for i in range(rows):
            f.write(json.dumps({"image": f"a/b/{i}.jpg", "caption": caption.format(i)}) + "\n")
    paths["parquet"] = os.path.join(folder, "pairs.parquet")
    writer = None
    for lo in range(0, rows, 500):  # written in row groups, never whole in memory
        t = pa.Table.from_pylist([{"image": pool[i % 50], "caption": caption.format(i)} for i in range(lo, min(rows, lo + 500))])
        writer = writer or pq.ParquetWriter(paths["parquet"], t.schema)
        writer.write_table(t)
    writer.close()
    paths["webdataset"] = write_webdataset(os.path.join(folder, "pairs.tar"), [
        {"jpg": pool[i % 50], "txt": caption.format(i).encode()} for i in range(rows)])
    paths["llava"] = os.path.join(folder, "llava.json")
    with open(paths["llava"], "w") as f:
        f.write("[\n")
        for i in range(rows):
            rec = {"id": str(i), "image": f"a/b/{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": caption.format(i)}]}
            f.write(("," if i else "") + json.dumps(rec) + "\n")
        f.write("]\n")
    return paths


def rss_benchmark(n: int) -> int:
    import subprocess

    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tiny_tokenizer(tmp)
        inputs = {size: write_inputs(os.path.join(tmp, str(size)), size) for size in (n, 10 * n)}
        print(f"peak RSS of preprocessing (one process, 1 worker, 80 px JPEG -> 64 px encoded), N = {n} rows:")
        for fmt in ("jsonl", "parquet", "webdataset", "llava"):
            peaks = []
            for size in (n, 10 * n):
                folder = os.path.join(tmp, str(size))
                cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", inputs[size][fmt], fmt,
                       os.path.join(folder, "out_" + fmt, "ds"), tok, os.path.join(folder, "images")]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                out = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                if status != 0:
                    raise RuntimeError(f"{cmd} failed")
                result = json.loads(out.strip().splitlines()[-1])
                peaks.append((usage.ru_maxrss / 1024, result))  # ru_maxrss is in KiB on Linux
            (small, r1), (large, r10) = peaks
            print(f"  {fmt:10s} {r1['rows']:>7} rows: {small:6.0f} MiB   {r10['rows']:>7} rows: {large:6.0f} MiB   "
                  f"ratio {large / small:.2f} ({r10['samples']} samples in {r10['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
