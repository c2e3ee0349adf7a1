#!/usr/bin/env python
"""Understanding against the data seen, from runs' metrics.jsonl (the paper's Fig. 4).

    python tools/plot_understanding.py RUN_DIR [RUN_DIR ...] --output fig.png \\
        [--x samples_seen|step] [--labels A,B] [--summary [--eval-metrics RUN/eval_metrics.json]]

Each RUN_DIR is a run's logging.dir; its ``understanding`` records (logging.eval_sets, scored
every logging.eval_interval steps) give the answer accuracy of each held-out set against the
samples seen, drawn with the set's chance level (eval/curves.py). ``--summary`` also prints the
last evaluation's figures beside their chance levels (the first run's); a run without any
understanding record is an error (exit 1).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.eval import curves  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (logging.dir), each with metrics.jsonl")
    p.add_argument("--output", help="the PNG to write (default: only --summary)")
    p.add_argument("--x", default="samples_seen", choices=["samples_seen", "step"])
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: folder names)")
    p.add_argument("--title")
    p.add_argument("--summary", action="store_true", help="print the first run's last figures beside chance")
    p.add_argument("--eval-metrics", help="evaluate.py's JSON for the summary (retrieval beside its chance)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        p.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    if not args.output and not args.summary:
        p.error("nothing to do: give --output and/or --summary")
    try:
        if args.summary:
            eval_metrics = None
            if args.eval_metrics:
                with open(args.eval_metrics) as handle:
                    eval_metrics = json.load(handle)
            print("\n".join(curves.summary_lines(args.runs[0], eval_metrics)))
        if args.output:
            curves.plot_understanding(args.runs, args.output, x=args.x, labels=labels, title=args.title)
            print(f"plot: {args.output}")
    except (OSError, ValueError) as exc:
        print(f"plot_understanding: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
