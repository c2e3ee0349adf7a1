#!/usr/bin/env python
"""Merge preprocessed shards into one shard.

    python tools/merge_shards.py --input data/shapes/train --output-prefix data/shapes/train_merged

Each --input is a dataset prefix (all its PREFIX_NNNNN shards) or a single shard prefix.

Joining the K jobs of a split preprocessing run (tools/preprocess_data.py --num-shards K):

    python tools/merge_shards.py --input data/train --num-parts 4 --output-prefix data/train_all

takes data/train.part00000-of-00004 ... in order (the samples one job would have written) and
also writes OUTPUT.rejects.jsonl and OUTPUT.summary.json from the parts'.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.data.preprocess.merge import merge_reports, merge_shards, part_inputs  # noqa: E402
from megatron_unihetero.data.shards import list_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset or shard prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--num-parts", type=int, default=None,
                   help="each --input is the --output-prefix of a run split into this many jobs")
    args = p.parse_args(argv)
    inputs = args.input
    if args.num_parts:
        inputs = [part for prefix in args.input for part in part_inputs(prefix, args.num_parts)]
    # A part whose rows were all rejected (or that got no rows) has no shard: nothing to join.
    meta = merge_shards([p for p in inputs if list_shards(p)] if args.num_parts else inputs, args.output_prefix)
    if args.num_parts:
        report = merge_reports(inputs, args.output_prefix)
        print(f"{report['rows']} rows, {report['rejected']} rejected (see {report['rejects_file']})")
    print(f"merged {len(meta['merged_from'])} shards into {args.output_prefix}: "
          f"{meta['num_samples']} samples, {meta['num_images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
