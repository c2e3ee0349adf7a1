#!/usr/bin/env python
"""Merge preprocessed shards into one shard.

    python tools/merge_shards.py --input data/shapes/train --output-prefix data/shapes/train_merged

Each --input is a dataset prefix (all its PREFIX_NNNNN shards) or a single shard prefix.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.preprocess.merge import merge_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset or shard prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    meta = merge_shards(args.input, args.output_prefix)
    print(f"merged {len(meta['merged_from'])} shards into {args.output_prefix}: "
          f"{meta['num_samples']} samples, {meta['num_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
