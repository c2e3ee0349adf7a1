"""Command line of the objective ablation (``python tools/run_ablation.py --help``)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from megatron_unihetero.ablation import report, runner
from megatron_unihetero.ablation.arms import ARMS

DESCRIPTION = """Train every arm of the UniHetero objective ablation at several data sizes and seeds,
evaluate each on the held-out split, and write results.csv, results.md and PNG plots.

Data size N = unique training image-text pairs (the first N rows of the demo train split);
each run takes round(N * --steps-per-sample) optimizer steps (at least --min-steps), so every
size sees its data the same number of times and samples seen grow with N (see
megatron_unihetero/ablation/runner.py). Runs live in WORK_DIR/ARM/nN_seedS_stepsT/ and are
reused when finished (result.json), so an interrupted sweep resumes where it stopped.
"""


def _list(text: str, kind=str) -> List:
    return [kind(t) for t in text.replace(",", " ").split() if t]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), help=f"arms to run (default all: {' '.join(ARMS)})")
    p.add_argument("--data-sizes", default="500,1000,2000", help="unique training pairs per run, comma-separated")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument("--steps-per-sample", type=float, default=0.1,
                   help="optimizer steps per unique training pair (steps = round(N * this))")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=300, help="held-out rows evaluated (evaluate --max-samples)")
    p.add_argument("--output", default="docs/ablation", help="where results.csv / results.md / PNGs go")
    p.add_argument("--data", default="runs/ablation/data", help="demo data folder (made when missing)")
    p.add_argument("--work-dir", default="runs/ablation", help="one folder per run under here")
    p.add_argument("--config-dir", default=None, help="arm configs (default examples/configs/ablation)")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (default sequential)")
    p.add_argument("--num-demo-samples", type=int, default=None, help="demo data size when it is made")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    p.add_argument("--notes", default=None, help="a Markdown file inserted into results.md (the reading)")
    p.add_argument("--report-only", action="store_true", help="no training: rewrite the report from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    arms = []
    for a in args.arms:
        arms += _list(a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    args.arms = arms
    args.data_sizes = _list(args.data_sizes, int)
    args.seeds = _list(args.seeds, int)
    if not args.data_sizes or min(args.data_sizes) <= 0:
        p.error("--data-sizes must be positive integers")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    command = "python tools/run_ablation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    log = lambda msg: print(f"[run_ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    specs = runner.plan(args.arms, args.data_sizes, args.seeds, args.steps_per_sample, args.min_steps)
    if args.dry_run:
        for s in specs:
            print(s.name)
        print(f"{len(specs)} runs")
        return 0
    if not args.report_only:
        runner.prepare_data(args.data, args.data_sizes, num_demo_samples=args.num_demo_samples, log=log)
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        failed = []

        def do(spec):
            try:
                runner.run_one(spec, work_dir=args.work_dir, data_dir=args.data,
                               eval_samples=args.eval_samples, config_dir=args.config_dir,
                               keep_checkpoints=args.keep_checkpoints, threads=threads, log=log)
            except Exception as exc:  # one failed run must not stop the sweep; reported below
                failed.append(spec.name)
                log(f"[{spec.name}] FAILED: {exc}")

        log(f"{len(specs)} runs, {args.jobs} at a time")
        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(do, specs))
        else:
            for spec in specs:
                do(spec)
        if failed:
            log(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in their run folders)")
    results = runner.load_finished(args.work_dir, specs)
    if not results:
        log("no finished runs: nothing to report")
        return 1
    wall = time.perf_counter() - t_start
    chance = runner.chance_accuracy(args.data, args.eval_samples)
    header = _header(args, command, specs, results, wall, started, chance)
    notes = open(args.notes).read() if args.notes else ""
    labels = {name: arm.label for name, arm in ARMS.items()}
    paths = report.write_results(results, args.output, labels=labels, arm_order=list(ARMS),
                                 header=header, notes=notes, chance=chance)
    log(f"{len(results)}/{len(specs)} runs reported; wrote {', '.join(paths.values())} "
        f"({wall / 60:.1f} min)")
    return 0


def _header(args, command, specs, results, wall, started, chance) -> str:
    info = runner.describe(specs, args.data)
    run_wall = sum(r.get("wall_s") or 0.0 for r in results)
    lines = [
        f"Generated by `{command}`" + (" (report only, from finished runs)" if args.report_only else "")
        + f" on {started:%Y-%m-%d %H:%M} UTC; {platform.machine()} CPU, {os.cpu_count()} cores "
        f"(shared with other jobs), torch on CPU.",
        "",
        f"- Runs: {len(results)} of {len(specs)} planned ({len(args.arms)} arms x "
        f"{len(args.data_sizes)} data sizes x {len(args.seeds)} seeds: {', '.join(map(str, args.seeds))}); "
        f"sum of per-run wall time {run_wall / 60:.1f} min"
        + ("" if args.report_only else f", sweep wall time {wall / 60:.1f} min") + ".",
        "- Data size N = unique training image-text pairs (first N rows of the shapes-world train "
        "split; each row gives a caption document and a question/answer document). Steps = "
        f"round(N x {args.steps_per_sample}) (min {args.min_steps}), micro-batch 8 packed rows of "
        "128 tokens, lr warmup 10% of steps then cosine to 0.1x, so each size sees its pairs the same "
        "number of times (column `epochs`) and samples seen grow with N.",
        "- Per size: " + "; ".join(f"N={n}: {d['steps']} steps, {d['documents']} documents"
                                   for n, d in sorted(info.items())) + ".",
        f"- Evaluation: `python -m megatron_unihetero.evaluate` on the first {args.eval_samples} rows of "
        "the held-out valid.parquet (never trained on): answer accuracy = pick the highest-likelihood "
        "candidate answer" + (f" (chance {chance:.3f})" if chance is not None else "") + "; caption "
        "perplexity; linear probes (test accuracy) of the mean visual hidden state for shape / colour / "
        "position / size of the first object; semantic retrieval top-1 (semantic arms only). Final "
        "losses are means over the last 10 training steps.",
        "- Slopes: least-squares fit of the metric against log10(N) over every run of an arm (all "
        "seeds), i.e. the change per 10x data.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
