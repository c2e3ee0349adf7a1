#!/usr/bin/env python
"""Generate the built-in "shapes world" data set as DIR/train.parquet and DIR/valid.parquet.

    python tools/make_demo_data.py --output data/shapes --num-samples 2000 --seed 0
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.demo_world import write_demo_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, required=True, help="total samples (train + valid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--valid-fraction", type=float, default=0.1, help="held-out fraction (the last samples)")
    args = p.parse_args(argv)
    t0 = time.time()
    counts = write_demo_data(args.output, args.num_samples, args.seed, args.image_size, args.valid_fraction)
    print(f"wrote {counts['train']} train + {counts['valid']} valid samples to {args.output} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
