"""Image generation's speed from a checkpoint: the KV cache against full recompute.

    python benchmarks/image_generation.py --load CKPT [--prompts 4] [--repeats 3] [--steps N] \\
        [--cfg-scale S] [--threads 1]

Loads the checkpoint as tools/generate_image.py does (one process, TP=PP=1), generates one
batch of ``--prompts`` demo-world captions (prompt i: seed i) with the cache and with full
recompute, interleaved run by run, and prints the best-of-``--repeats`` wall and process CPU
time of each, their ratio, and the largest difference of the two paths' latents and fed
embeddings (they must agree to float rounding). On CPU the ratio uses CPU time (the machines
are shared: wall time measures the neighbours too), as benchmarks/kernel_speed.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CAPTIONS = ("a large red circle in the center", "a small blue square at the top left",
            "a large green triangle at the bottom and a small yellow cross at the top",
            "a small purple circle at the right")


def main(argv=None) -> int:
    import torch

    from megatron_unihetero import evaluate, parallel
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.generation import sample

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    iteration = evaluate.resolve_iteration_dir(args.load)
    run_config, model = evaluate.build_from_checkpoint(iteration)
    tokenizer = build_tokenizer(args.tokenizer or run_config.data.tokenizer)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.prompts)]
    prompts = [sample.image_prompt(tokenizer, c) for c in captions]
    params = sample.ImageSampling(cfg_scale=args.cfg_scale, num_steps=args.steps)
    best = {True: [float("inf")] * 2, False: [float("inf")] * 2}
    out = {}
    for _ in range(args.repeats):
        for cache in (True, False):
            wall, cpu = time.perf_counter(), time.process_time()
            out[cache] = sample.generate_latents(model, prompts, params, use_cache=cache)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[cache] = [min(best[cache][0], wall), min(best[cache][1], cpu)]
    key = 0 if torch.cuda.is_available() else 1
    report = {
        "prompts": args.prompts, "visual_tokens": model.tokens_per_image,
        "prompt_tokens": [len(x) for x in prompts], "cfg_scale": args.cfg_scale,
        "ddim_steps": args.steps or run_config.model.pixel.num_sampling_steps,
        "threads": args.threads,
        "cache_wall_s": round(best[True][0], 4), "cache_cpu_s": round(best[True][1], 4),
        "recompute_wall_s": round(best[False][0], 4), "recompute_cpu_s": round(best[False][1], 4),
        "speedup": round(best[False][key] / best[True][key], 2),
        "max_latent_diff": float((out[True].latents - out[False].latents).abs().max()),
        "max_embedding_diff": float((out[True].embeddings - out[False].embeddings).abs().max()),
    }
    print(json.dumps(report, indent=1))
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
