"""GPU check of the megatron engine: bf16 + megatron-core's distributed optimizer on CUDA.

    python benchmarks/gpu_train_check.py [--workdir DIR] [--throughput-steps 12]

Runs ``python -m megatron_unihetero.pretrain`` (one process: world of one, NCCL) on synthetic
shards, each run in a fresh process as a user would:

1. tiny model, bf16, distributed optimizer, 6 steps straight;
2. the same stopped after step 3 and restarted: the resumed steps 4-6 must continue the
   straight run's losses (the fp32 masters and Adam moments come back from the checkpoint);
3. the same with the replicated optimizer (``parallel.distributed_optimizer=false``): the
   same losses (both step fp32 masters);
4. the same with ``train.compile`` (the decoder layers torch.compiled, Triton kernels by
   TorchInductor, our Triton kernels inside): the straight run's losses, within bf16 rounding;
5. throughput of a ~150M-parameter LLM (12 layers, hidden 1024, seq 2048): tokens/s, MFU and
   peak memory from the run's metrics.

Prints every figure; exits non-zero when a check fails. The CPU suite covers the same paths
with gloo (tests/training); this is where the CUDA-only code of megatron-core runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_unihetero.testing.runs import TINY_RUN, run_overrides, train_records  # noqa: E402

TINY = dict(TINY_RUN, **{"train.dtype": "bf16"})

MEDIUM = dict(TINY, **{
    "model.llm.num_layers": 12, "model.llm.hidden_size": 1024, "model.llm.num_attention_heads": 16,
    "model.llm.num_query_groups": 16, "model.llm.ffn_hidden_size": 2816,
    "model.llm.vocab_size": 32000, "model.llm.max_sequence_length": 2048,
    "data.seq_length": 2048, "data.micro_batch_size": 8, "data.pack_window": 2048,
    "train.lr": 3e-4, "train.warmup_steps": 2, "checkpoint.save_interval": 0,
})


def pretrain(data_prefix: str, run_dir: str, settings: dict, **extra) -> dict:
    """One run of the pretrain entry point in its own process; returns {step: record}."""
    cmd = [sys.executable, "-m", "megatron_unihetero.pretrain",
           *run_overrides(data_prefix, run_dir, settings, **extra)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"pretrain failed ({run_dir})")
    print(f"  run {os.path.basename(run_dir)}: {time.perf_counter() - start:.1f} s")
    return train_records(run_dir)


def max_relative_difference(a: dict, b: dict, steps) -> float:
    return max(abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--attention", default="auto",
                        help="comma list of model.llm.attention_impl values for the throughput run")
    parser.add_argument("--throughput-only", action="store_true", help="skip the tiny-run checks")
    parser.add_argument("--compile", action="store_true",
                        help="also time each throughput run with train.compile")
    args = parser.parse_args()

    import torch

    from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset

    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_check.py needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_train_check_")
    tiny_data = os.path.join(work, "tiny", "synthetic")
    medium_data = os.path.join(work, "medium", "synthetic")
    write_synthetic_dataset(tiny_data, num_samples=400, image_size=16, max_images=2, text_len=(4, 30))
    write_synthetic_dataset(medium_data, num_samples=4000, image_size=16, max_images=2,
                            text_len=(200, 1200))
    failures = []
    if not args.throughput_only:
        failures += check_resume_and_optimizers(tiny_data, work)
    for impl, compiled in [(impl, compiled) for impl in args.attention.split(",")
                           for compiled in ([False, True] if args.compile else [False])]:
        name = f"medium_{impl}" + ("_compiled" if compiled else "")
        medium = pretrain(medium_data, os.path.join(work, name), MEDIUM,
                          **{"train.steps": args.throughput_steps, "model.llm.attention_impl": impl,
                             "train.compile": compiled})
        timed = [medium[s] for s in sorted(medium)[2:]]  # skip warm-up steps (compilation, caches)
        median = lambda key: sorted(r[key] for r in timed)[len(timed) // 2]  # noqa: E731
        print(f"throughput (12 x 1024 LLM, seq 2048, micro 8, bf16, distributed optimizer, "
              f"attention {impl}{', train.compile' if compiled else ''}): "
              f"{median('tokens_per_s'):,.0f} tokens/s, "
              f"{median('tflops_per_s'):.1f} TFLOP/s, MFU {median('mfu'):.3f}, "
              f"memory {max(r['memory_gb'] for r in timed):.1f} GB")

    for failure in failures:
        print("FAILED:", failure)
    print("gpu_train_check:", "FAILED" if failures else "OK")
    return 1 if failures else 0


def check_resume_and_optimizers(tiny_data: str, work: str) -> list:
    failures = []
    straight = pretrain(tiny_data, os.path.join(work, "straight"), TINY)
    pretrain(tiny_data, os.path.join(work, "stopped"), TINY, **{"train.steps": 3})
    resumed = pretrain(tiny_data, os.path.join(work, "stopped"), TINY)
    replicated = pretrain(tiny_data, os.path.join(work, "replicated"), TINY,
                          **{"parallel.distributed_optimizer": False})
    print("losses (straight):  ", [round(straight[s]["loss"], 5) for s in sorted(straight)])
    print("losses (resumed):   ", [round(resumed[s]["loss"], 5) for s in sorted(resumed)])
    print("losses (replicated):", [round(replicated[s]["loss"], 5) for s in sorted(replicated)])
    compiled = pretrain(tiny_data, os.path.join(work, "compiled"), TINY, **{"train.compile": True})
    print("losses (compiled):  ", [round(compiled[s]["loss"], 5) for s in sorted(compiled)])
    resume_diff = max_relative_difference(resumed, straight, (4, 5, 6))
    replicated_diff = max_relative_difference(replicated, straight, range(1, 7))
    compiled_diff = max_relative_difference(compiled, straight, range(1, 7))
    print(f"resume: max relative loss difference, steps 4-6: {resume_diff:.2e}")
    print(f"distributed vs replicated optimizer, steps 1-6: {replicated_diff:.2e}")
    print(f"train.compile vs eager, steps 1-6: {compiled_diff:.2e}")
    # bf16 on CUDA: the attention backward may use atomics, so not bitwise; 1e-3 is far below
    # what a lost optimizer state would cost (the first resumed step jumps by ~1e-1).
    if resume_diff > 1e-3:
        failures.append(f"resume differs by {resume_diff:.2e}")
    if replicated_diff > 1e-3:
        failures.append(f"distributed vs replicated optimizer differ by {replicated_diff:.2e}")
    # Inductor keeps fused bf16 elementwise chains in fp32 (eager rounds after each op).
    if compiled_diff > 1e-2:
        failures.append(f"train.compile vs eager differ by {compiled_diff:.2e}")
    if not straight[6]["loss"] < straight[1]["loss"]:
        failures.append("the tiny run's loss did not go down")

    return failures


if __name__ == "__main__":
    sys.exit(main())
