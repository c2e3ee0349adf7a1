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
from megatron_unihetero.ablation.arms import ARMS, PAPER_ARMS, REPO_ROOT

DESCRIPTION = """Train every arm of the UniHetero objective ablation at several data sizes and seeds,
evaluate each on held-out data, and write results.csv, results.md and PNG plots.

Data size N = unique training samples, the first N of one pool: by default the shapes world
(N rows of its train split, each a caption and a question/answer document; made in --data when
missing), or --train-shards PREFIX ... (any preprocessed shards: their first N samples, with
--tokenizer and --held-out). Each run takes round(N * --steps-per-sample) optimizer steps (at
least --min-steps), so every size sees its data the same number of times and samples seen grow
with N (see megatron_unihetero/ablation/runner.py). Held-out data: the demo valid.parquet, or
--held-out (a parquet in the demo layout or a VLMEvalKit multiple-choice .tsv, scored by
likelihood).

Launchers: local (default; --jobs runs side by side), torchrun (--nproc-per-node ranks per run)
or slurm (one array task per arm x size x seed; --dry-run prints the sbatch script). Runs live
in WORK_DIR/ARM/nN_seedS_stepsT/ and are reused when finished (result.json), so an interrupted
sweep resumes where it stopped and a SLURM array holds only the unfinished runs.
"""


def _list(text: str, kind=str) -> List:
    return [kind(t) for t in text.replace(",", " ").split() if t]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(PAPER_ARMS),
                   help=f"arms to run, or 'all' (default the paper's five: {' '.join(PAPER_ARMS)}; "
                        f"all: {' '.join(ARMS)})")
    p.add_argument("--data-sizes", default="500,1000,2000", help="unique training samples per run, comma-separated")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument("--steps-per-sample", type=float, default=0.1,
                   help="optimizer steps per unique training sample (steps = round(N * this))")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=300, help="held-out rows evaluated (evaluate --max-samples)")
    p.add_argument("--output", default="docs/ablation", help="where results.csv / results.md / PNGs go")
    p.add_argument("--data", default="runs/ablation/data",
                   help="demo data folder (made when missing); with --train-shards, where the subsets go")
    p.add_argument("--train-shards", nargs="+", default=[], metavar="PREFIX",
                   help="preprocessed shard/dataset prefixes: the pool whose first N samples a run trains on")
    p.add_argument("--tokenizer", default=None, help="the shards' tokenizer (default the demo data's)")
    p.add_argument("--held-out", default=None,
                   help="held-out parquet (demo layout) or VLMEvalKit multiple-choice .tsv "
                        "(default the demo data's valid.parquet)")
    p.add_argument("--vision-encoder", default=None, metavar="DIR",
                   help="a local Dinov2Model folder (tools/pretrain_vision_encoder.py) used, frozen, "
                        "by every arm (sets model.vision.path)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every run (repeatable), e.g. train.lr=3e-4")
    p.add_argument("--work-dir", default="runs/ablation", help="one folder per run under here")
    p.add_argument("--config-dir", default=None, help="arm configs (default examples/configs/ablation)")
    p.add_argument("--launcher", choices=runner.LAUNCHERS, default="local")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="torchrun (and slurm tasks): data-parallel ranks per run")
    p.add_argument("--jobs", type=int, default=1, help="local/torchrun: runs at the same time (default sequential)")
    p.add_argument("--num-demo-samples", type=int, default=None, help="demo data size when it is made")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    p.add_argument("--notes", default=None, help="a Markdown file inserted into results.md (the reading)")
    p.add_argument("--report-only", action="store_true", help="no training: rewrite the report from finished runs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (slurm: the sbatch array script) and exit; nothing is run or written")
    s = p.add_argument_group("slurm (--launcher slurm)")
    s.add_argument("--slurm-partition")
    s.add_argument("--slurm-account")
    s.add_argument("--slurm-time", default="02:00:00")
    s.add_argument("--slurm-gpus-per-task", type=int, default=0)
    s.add_argument("--slurm-cpus-per-task", type=int, default=4)
    s.add_argument("--slurm-mem")
    s.add_argument("--slurm-max-parallel", type=int, default=None, help="at most K array tasks at once (%%K)")
    s.add_argument("--slurm-extra", action="append", default=[], metavar="OPTION",
                   help="one more #SBATCH option, e.g. --slurm-extra=--qos=low (repeatable)")
    # One task of a SLURM array (written by the slurm launcher; not for direct use).
    p.add_argument("--run-task", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task-index", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_task is not None:
        if args.task_index is None:
            p.error("--run-task needs --task-index")
        return args
    arms = []
    for a in args.arms:
        arms += list(ARMS) if a == "all" else _list(a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)} or 'all'")
    args.arms = arms
    args.data_sizes = _list(args.data_sizes, int)
    args.seeds = _list(args.seeds, int)
    if not args.data_sizes or min(args.data_sizes) <= 0:
        p.error("--data-sizes must be positive integers")
    if args.nproc_per_node < 1:
        p.error("--nproc-per-node must be >= 1")
    if args.launcher == "local" and args.nproc_per_node > 1:
        p.error("--nproc-per-node > 1 needs --launcher torchrun (or slurm)")
    bad = [o for o in args.override if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"--override takes SECTION.KEY=VALUE; got {bad}")
    if args.vision_encoder and not os.path.isfile(os.path.join(args.vision_encoder, "config.json")):
        p.error(f"--vision-encoder {args.vision_encoder!r}: no config.json there (a Dinov2Model folder, "
                "e.g. from tools/pretrain_vision_encoder.py)")
    # Absolute paths: runs execute in the repository root (and SLURM tasks on other nodes).
    absolute = lambda path: os.path.abspath(path) if path else path
    try:
        args.source = runner.DataSource(absolute(args.data), [absolute(p) for p in args.train_shards],
                                        absolute(args.tokenizer), absolute(args.held_out),
                                        args.num_demo_samples)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _options(args, threads=None) -> runner.RunOptions:
    inner = "torchrun" if args.launcher == "torchrun" or args.nproc_per_node > 1 else "local"
    return runner.RunOptions(
        work_dir=os.path.abspath(args.work_dir), source=args.source, eval_samples=args.eval_samples,
        config_dir=os.path.abspath(args.config_dir) if args.config_dir else None,
        keep_checkpoints=args.keep_checkpoints, threads=threads,
        launcher=inner, nproc_per_node=args.nproc_per_node, vision_encoder=args.vision_encoder,
        overrides=[f"--{o}" for o in args.override])


def _slurm(args) -> runner.SlurmOptions:
    return runner.SlurmOptions(partition=args.slurm_partition, account=args.slurm_account,
                               time=args.slurm_time, gpus_per_task=args.slurm_gpus_per_task,
                               cpus_per_task=args.slurm_cpus_per_task, mem=args.slurm_mem,
                               max_parallel=args.slurm_max_parallel, extra=list(args.slurm_extra))


def run_task(plan_path: str, index: int) -> int:
    """One SLURM array task: run ``index`` of the plan (a no-op when it is finished)."""
    specs, opts = runner.read_plan(plan_path)
    if not 0 <= index < len(specs):
        raise SystemExit(f"--task-index {index} out of range: {plan_path} has {len(specs)} runs")
    log = lambda msg: print(f"[run_ablation task {index} {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    runner.run_one(specs[index], opts, log=log)
    return 0


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    if args.run_task is not None:
        return run_task(args.run_task, args.task_index)
    command = "python tools/run_ablation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    log = lambda msg: print(f"[run_ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    specs = runner.plan(args.arms, args.data_sizes, args.seeds, args.steps_per_sample, args.min_steps)
    todo = [s for s in specs if not runner.is_finished(args.work_dir, s)]
    if args.launcher == "slurm" and not args.report_only:
        return _submit_slurm(args, specs, todo, log)
    if args.dry_run:
        for s in specs:
            print(s.name + ("" if s in todo else "  (finished)"))
        print(f"{len(specs)} runs, {len(todo)} to run")
        return 0
    if not args.report_only:
        args.source.prepare(args.data_sizes, log=log)
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        opts = _options(args, threads)
        failed = []

        def do(spec):
            try:
                runner.run_one(spec, opts, log=log)
            except Exception as exc:  # one failed run must not stop the sweep; reported below
                failed.append(spec.name)
                log(f"[{spec.name}] FAILED: {exc}")

        log(f"{len(specs)} runs ({len(specs) - len(todo)} finished already), {args.jobs} at a time")
        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(do, specs))
        else:
            for spec in specs:
                do(spec)
        if failed:
            log(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in their run folders)")
    return _report(args, specs, command, t_start, started, log)


def _submit_slurm(args, specs, todo, log) -> int:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    slurm_dir = os.path.join(os.path.abspath(args.work_dir), "slurm")
    plan_path = os.path.join(slurm_dir, f"plan_{stamp}.json")
    script_path = os.path.join(slurm_dir, f"sweep_{stamp}.sbatch")
    report_cmd = ("python tools/run_ablation.py " + " ".join(
        shlex.quote(a) for a in _report_argv(args)) + " --report-only")
    if not todo:
        log(f"all {len(specs)} runs are finished; the report: {report_cmd}")
        return 0
    script = runner.sbatch_script(todo, plan_path, _slurm(args), log_dir=slurm_dir)
    if args.dry_run:
        print(f"# would write {plan_path} ({len(todo)} of {len(specs)} runs; "
              f"{len(specs) - len(todo)} finished) and submit {script_path}:")
        print(script)
        print(f"# then, when the array is done: {report_cmd}")
        return 0
    args.source.prepare(args.data_sizes, log=log)  # once, here: every task reads the same subsets
    runner.write_plan(plan_path, todo, _options(args))
    with open(script_path, "w") as handle:
        handle.write(script)
    job = runner.submit(script_path)
    log(f"submitted array job {job}: {len(todo)} runs ({script_path}); when it is done: {report_cmd}")
    return 0


def _report_argv(args) -> List[str]:
    out = ["--arms", ",".join(args.arms), "--data-sizes", ",".join(map(str, args.data_sizes)),
           "--seeds", ",".join(map(str, args.seeds)), "--steps-per-sample", str(args.steps_per_sample),
           "--min-steps", str(args.min_steps), "--eval-samples", str(args.eval_samples),
           "--work-dir", args.work_dir, "--data", args.data, "--output", args.output]
    if args.train_shards:
        out += ["--train-shards", *args.train_shards, "--tokenizer", args.tokenizer]
    if args.held_out:
        out += ["--held-out", args.held_out]
    return out


def _report(args, specs, command, t_start, started, log) -> int:
    results = runner.load_finished(args.work_dir, specs)
    if not results:
        log("no finished runs: nothing to report")
        return 1
    wall = time.perf_counter() - t_start
    chance = runner.chance_accuracy(args.source.held_out_path, args.eval_samples)
    header = _header(args, command, specs, results, wall, started, chance)
    notes = open(args.notes).read() if args.notes else ""
    labels = {name: arm.label for name, arm in ARMS.items()}
    paths = report.write_results(results, args.output, labels=labels, arm_order=list(ARMS),
                                 header=header, notes=notes, chance=chance)
    log(f"{len(results)}/{len(specs)} runs reported; wrote {', '.join(paths.values())} "
        f"({wall / 60:.1f} min)")
    return 0


def _header(args, command, specs, results, wall, started, chance) -> str:
    info = runner.describe(specs, args.source)
    run_wall = sum(r.get("wall_s") or 0.0 for r in results)
    held_out = args.source.held_out_path
    if os.path.abspath(held_out).startswith(REPO_ROOT + os.sep):  # the report names repo paths relatively
        held_out = os.path.relpath(held_out, REPO_ROOT)
    lines = [
        f"Generated by `{command}`" + (" (report only, from finished runs)" if args.report_only else "")
        + f" on {started:%Y-%m-%d %H:%M} UTC; {platform.machine()} CPU, {os.cpu_count()} cores "
        f"(shared with other jobs), torch on CPU.",
        "",
        f"- Runs: {len(results)} of {len(specs)} planned ({len(args.arms)} arms x "
        f"{len(args.data_sizes)} data sizes x {len(args.seeds)} seeds: {', '.join(map(str, args.seeds))}); "
        f"sum of per-run wall time {run_wall / 60:.1f} min"
        + ("" if args.report_only else f", sweep wall time {wall / 60:.1f} min") + ".",
        f"- Data size N = unique training samples ({args.source.describe_pool()}). Steps = "
        f"round(N x {args.steps_per_sample}) (min {args.min_steps}), lr warmup 10% of steps then "
        "cosine to 0.1x, so each size sees its samples the same number of times (column `epochs`) "
        "and samples seen grow with N.",
        "- Vision encoder: " + (f"`{args.vision_encoder}` (pretrained, frozen)" if args.vision_encoder
                                else "random-init, frozen (the arm configs' hf_config)") + ".",
        "- Per size: " + "; ".join(f"N={n}: {d['steps']} steps, {d['documents']} documents"
                                   for n, d in sorted(info.items())) + ".",
        f"- Evaluation: `python -m megatron_unihetero.evaluate` on the first {args.eval_samples} rows of "
        f"`{held_out}` (never trained on): answer accuracy = pick the highest-likelihood "
        "candidate answer" + (f" (chance {chance:.3f})" if chance is not None else "") + "; caption "
        "perplexity and linear probes (test accuracy) of the mean visual hidden state for shape / colour / "
        "position / size of the first object (demo layout only); semantic retrieval top-1 / top-5 and "
        "held-out R² (semantic arms only). Final losses and training diagnostics (R², baselines, "
        "embedding norms: eval/diagnostics.py) are means over the last 10 training steps.",
        "- Slopes: least-squares fit of the metric against log10(N) over every run of an arm (all "
        "seeds), i.e. the change per 10x data.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
