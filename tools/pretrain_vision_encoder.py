#!/usr/bin/env python
"""Pretrain a small DINOv2 self-supervised on shapes-world images, for CPU-scale ablations.

    python tools/pretrain_vision_encoder.py --output runs/encoders/dinov2_shapes [--steps 1500]

Writes a folder that ``transformers.Dinov2Model.from_pretrained`` loads (the ablation arms
use it frozen: ``tools/run_ablation.py --vision-encoder FOLDER``, or
``--model.vision.path=FOLDER`` on any config), with ``pretrain_report.json``: the training
record and the quality of the frozen features, as linear-probe test accuracy on the
shapes-world attributes and the next-patch R², next to a random encoder of the same shape
(the one the ablation configs build without a path). The objective and why it fits the
paper's use of DINOv2: megatron_unihetero/ablation/vision_pretrain.py.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.ablation import vision_pretrain as vp  # noqa: E402
from megatron_unihetero.models.unihetero import VISION_INIT_SEED  # noqa: E402


def parse_args(argv=None):
    d = vp.PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the encoder folder to write")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--num-images", type=int, default=d.num_images, help="training pool size")
    p.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="shapes-world seed of the training pool (keep it off the ablation's data seed 0)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mask-ratio", type=float, default=d.mask_ratio)
    p.add_argument("--patch-weight", type=float, default=d.patch_weight)
    p.add_argument("--patch-negatives", choices=("all", "same_position"), default=d.patch_negatives,
                   help="the patch-level InfoNCE's candidates: every patch of the batch, or the same "
                        "position of every image")
    p.add_argument("--encoder", default=None,
                   help="JSON Dinov2Config overrides (default: the ablation configs' encoder "
                        f"{json.dumps(vp.DEFAULT_ENCODER)})")
    p.add_argument("--probe-images", type=int, default=2000, help="images scored by the probes")
    p.add_argument("--probe-seed", type=int, default=2000, help="shapes-world seed of the probe images")
    p.add_argument("--no-probes", action="store_true", help="skip the quality report")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = dict(vp.DEFAULT_ENCODER, **(json.loads(args.encoder) if args.encoder else {}))
    cfg = vp.PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            num_images=args.num_images, data_seed=args.data_seed, seed=args.seed,
                            mask_ratio=args.mask_ratio, patch_weight=args.patch_weight,
                            patch_negatives=args.patch_negatives,
                            warmup_steps=min(vp.PretrainConfig().warmup_steps, max(1, args.steps // 10)),
                            encoder=encoder)
    log = lambda msg: print(f"[pretrain_vision_encoder {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    model, record = vp.pretrain(cfg, log=log)
    log(f"trained {cfg.steps} steps in {record['train_s']:.0f} s (data {record['data_s']:.0f} s)")
    if not args.no_probes:
        t0 = time.perf_counter()
        pixels, attributes = vp.world_images(args.probe_images, args.probe_seed, encoder["image_size"])
        record["probes"] = {
            "pretrained": vp.probe_report(model, pixels, attributes),
            "random": vp.probe_report(vp.build_encoder(encoder, VISION_INIT_SEED), pixels, attributes),
            "probe_seed": args.probe_seed,
        }
        record["probe_s"] = time.perf_counter() - t0
        for name in ("pretrained", "random"):
            r = record["probes"][name]
            log(f"{name:10s}: probe mean {r['all']['mean']:.3f} (single-object {r['single_object']['mean']:.3f}), "
                + ", ".join(f"{a} {r['single_object'][a]['test_accuracy']:.3f}" for a in vp.PROBE_ATTRIBUTES)
                + f"; next-patch R² {r['next_patch_r2']:.3f} (content {r['next_patch_r2_content']:.3f})")
    vp.save_encoder(model, args.output, record)
    log(f"wrote {args.output} ({vp.REPORT_NAME} has the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
