#!/usr/bin/env python
"""Preprocessing throughput on demo data: samples/s (and per worker) for 1 and 2 workers.

    python benchmarks/preprocess_throughput.py [--num-samples 2000] [--image-size 64] [--template both]

The time covers the whole run_preprocess call (worker start-up included), with megatron.core
imported beforehand so its one-off import (~5 s) is not counted. Imports stay inside main():
spawned workers re-execute this file's top level.
"""

import argparse
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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
