"""Pretrain a UniHetero model: ``python -m megatron_unihetero.pretrain --config RUN.yaml [--a.b=v ...]``.

Start it with torchrun (or the deepspeed launcher) for several processes; alone it runs as a
single process. Restarting the same command resumes from the newest complete checkpoint.
The libraries' warnings go to LOGGING_DIR/run.log, not the console (``--logging.verbose=true``:
both).

Exit codes: 0 done, 2 a config error (or data that
cannot be used: a damaged shard, an unfinished preprocessing run), 3 stopped after
``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient norm (nothing saved
at the stop; ``latest`` still names the last finite checkpoint), 4 no checkpoint to resume from
verifies against its manifest (with ``checkpoint.fallback=false``: the newest one fails; the
message names the file), or a checkpoint could not be written (a full disk: the message names
the folder; ``latest`` still names the previous checkpoint), 5 a collective failed or timed out
after ``parallel.timeout_minutes`` (a hung or dead rank; the message names what the run was
doing), 75 stopped before ``train.steps`` on ``train.exit_signal`` (SIGUSR1 by default) or
SIGTERM, or ahead of a deadline (``train.exit_after_minutes``, Slurm's ``SLURM_JOB_END_TIME``),
after saving: run the same command again (a requeue) to go on; the checkpoint folder's
``requeue.json`` says so too. Under torchrun that stop exits 0 instead (torchrun would take any
other status for a failed worker and restart it): launchers read ``requeue.json``
(training/stopping.py). A shard file that changes under the run is a
data error (exit 2) naming it; a process killed by a signal prints the Python stack it was in
(faulthandler).
"""

from __future__ import annotations

import argparse
import faulthandler

from megatron_unihetero import console

# Only what the command line needs is imported at the top. megatron-core's checkpoint writer
# starts a spawned helper process at a run's first save, which imports the main module again
# (as __mp_main__ under ``python -m``): a module top that imported torch and megatron-core
# would cost every rank seconds there. The run itself is training/launch.py, imported in main.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="run config YAML (see examples/configs/)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}; overrides look like --section.key=value")
    return args, overrides


def main(argv=None) -> dict:
    """Run it. Library warnings (this process's imports' too) and this package's ``logging``
    records go to ``LOGGING_DIR/run.log`` (``run.rank{R}.log`` on global rank R > 0), not to
    the console; ``logging.verbose=true`` prints them as well (megatron_unihetero/console.py)."""
    args, overrides = parse_args(argv)
    # A process killed by a signal (SIGBUS from a shard file truncated under its memory map,
    # SIGSEGV in a kernel) prints the Python stack it was in: the file and sample it read.
    faulthandler.enable(all_threads=True)
    # The libraries' import-time warnings (megatron-core: TransformerEngine / apex absent, ...)
    # are held until the run knows its log file; a second run in this process imports nothing.
    with console.held_warnings() as held:
        from megatron_unihetero.training import launch
    with console.RunLog(list(held)) as log:
        return launch.run(args.config, overrides, log)


if __name__ == "__main__":
    main()
