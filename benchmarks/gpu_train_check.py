"""GPU check of the megatron engine: bf16 + megatron-core's distributed optimizer on CUDA.

    python benchmarks/gpu_train_check.py [--workdir DIR] [--checks resume,replicated,compiled,export]
        [--preset medium|1p3b] [--compile] [--llava] [--throughput-steps 12] [--dry-run]

Runs ``python -m megatron_unihetero.pretrain`` (one process: world of one, NCCL) on synthetic
shards, each run in a fresh process as a user would:

1. tiny model, bf16, distributed optimizer, asynchronous checkpoint saves, 6 steps straight;
2. (resume) the same stopped after step 3 and restarted: the resumed steps 4-6 must continue
   the straight run's losses (the fp32 masters and Adam moments come back from the checkpoint);
3. (replicated) the same with the replicated optimizer
   (``parallel.distributed_optimizer=false``): the same losses (both step fp32 masters);
4. (compiled) the same with ``train.compile`` (the decoder layers torch.compiled, Triton
   kernels by TorchInductor, our Triton kernels inside): the straight run's losses, within
   bf16 rounding;
5. (export) tools/convert_checkpoint_to_hf.py of the straight run's last checkpoint;
6. throughput of the ``--preset`` model: ``medium`` (~150M-parameter LLM, 12 x 1024, seq 2048,
   tiny encoder) or ``1p3b`` (~1.3B LLM, 24 x 2048, + a DINOv2-L-shaped frozen encoder at
   224 px, seq 4096 packed): tokens/s, MFU (training/flops.py: the encoder's FLOPs counted)
   and peak memory from the run's metrics; ``--compile`` times it with ``train.compile`` too;
7. ``--llava``: the plain transformers Llava + AdamW loop (benchmarks/train_throughput.py's)
   at the preset's size on the same batch shape, bf16 autocast: tokens/s beside ours.

``--dry-run`` (no GPU needed): parses the arguments, imports what the runs import, builds and
checks every run's config (and the Llava reference on the meta device) and prints the runs it
would start, then exits.

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

TINY = dict(TINY, **{"checkpoint.async_save": True})

MEDIUM = dict(TINY, **{
    "model.llm.num_layers": 12, "model.llm.hidden_size": 1024, "model.llm.num_attention_heads": 16,
    "model.llm.num_query_groups": 16, "model.llm.ffn_hidden_size": 2816,
    "model.llm.vocab_size": 32000, "model.llm.max_sequence_length": 2048,
    "data.seq_length": 2048, "data.micro_batch_size": 8, "data.pack_window": 2048,
    "train.lr": 3e-4, "train.warmup_steps": 2, "checkpoint.save_interval": 0,
})

# ~1.3B LLM (24 x 2048, Llama-shaped) + a DINOv2-L-shaped frozen encoder (24 x 1024, 224 px,
# patch 14: 256 tokens per image), rows of 4096 packed tokens.
PRESET_1P3B = dict(MEDIUM, **{
    "model.llm.num_layers": 24, "model.llm.hidden_size": 2048, "model.llm.num_attention_heads": 16,
    "model.llm.num_query_groups": 16, "model.llm.ffn_hidden_size": 5632,
    "model.llm.max_sequence_length": 4096,
    "model.vision.hf_config": ("{hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, "
                               "intermediate_size: 4096, image_size: 224, patch_size: 14}"),
    "data.seq_length": 4096, "data.micro_batch_size": 1, "data.pack_window": 1024,
})
PRESETS = {"medium": (MEDIUM, dict(num_samples=4000, image_size=16, max_images=2, text_len=(200, 1200))),
           "1p3b": (PRESET_1P3B, dict(num_samples=600, image_size=224, max_images=1, text_len=(200, 900)))}
CHECKS = ("resume", "replicated", "compiled", "export")


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


def run_config(settings: dict, **extra):
    """The RunConfig pretrain would build from these settings (checked as it checks them)."""
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.training.config import RunConfig

    return load_config(RunConfig, None, run_overrides("/nonexistent/data", "/nonexistent/run", settings, **extra))


def planned_runs(args) -> list:
    """(name, settings, extra overrides) of every pretrain run, in order."""
    runs = []
    if "resume" in args.checks or "export" in args.checks:
        runs.append(("straight", TINY, {}))
    if "resume" in args.checks:
        runs += [("stopped", TINY, {"train.steps": 3}), ("resumed", TINY, {})]
    if "replicated" in args.checks:
        runs.append(("replicated", TINY, {"parallel.distributed_optimizer": False}))
    if "compiled" in args.checks:
        runs.append(("compiled", TINY, {"train.compile": True}))
    preset = PRESETS[args.preset][0]
    for impl in filter(None, args.attention.split(",")):
        for compiled in ([False, True] if args.compile else [False]):
            runs.append((f"{args.preset}_{impl}" + ("_compiled" if compiled else ""), preset,
                         {"train.steps": args.throughput_steps, "model.llm.attention_impl": impl,
                          "train.compile": compiled}))
    return runs


def dry_run(args) -> int:
    """Everything but the runs: imports, configs, the FLOPs the MFU divides by, the Llava
    reference's shapes (meta device). No GPU needed."""
    from megatron_unihetero import pretrain  # noqa: F401 - what each run imports
    from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset  # noqa: F401
    from megatron_unihetero.training.flops import flop_terms

    print(f"gpu_train_check dry run: checks {','.join(args.checks) or '-'}, preset {args.preset}")
    for name, settings, extra in planned_runs(args):
        cfg = run_config(settings, **extra)
        flop_terms(cfg.model)
        print(f"  would run pretrain {name}: {cfg.model.llm.num_layers} x {cfg.model.llm.hidden_size} LLM, "
              f"seq {cfg.data.seq_length}, micro {cfg.data.micro_batch_size}, {cfg.train.dtype}, "
              f"{cfg.train.steps} steps, distributed optimizer {cfg.parallel.distributed_optimizer}, "
              f"async save {cfg.checkpoint.async_save}, compile {cfg.train.compile}")
    if "export" in args.checks:
        load_tool("convert_checkpoint_to_hf")
        print("  would run tools/convert_checkpoint_to_hf.py on the straight run's checkpoint")
    if args.llava:
        import torch

        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        import train_throughput

        cfg = run_config(PRESETS[args.preset][0])
        with torch.device("meta"):
            model = train_throughput.build_hf_llava(cfg)
        print(f"  would time the transformers Llava + AdamW loop: "
              f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
              f"{args.llava_steps} steps")
    print("gpu_train_check dry run: OK")
    return 0


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma list of the tiny-model checks ({', '.join(CHECKS)}); '' for none")
    parser.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--attention", default="auto",
                        help="comma list of model.llm.attention_impl values for the throughput run "
                             "('' for no throughput run)")
    parser.add_argument("--throughput-only", action="store_true", help="skip the tiny-run checks")
    parser.add_argument("--compile", action="store_true",
                        help="also time each throughput run with train.compile")
    parser.add_argument("--llava", action="store_true",
                        help="also time the transformers Llava + AdamW loop at the preset's size")
    parser.add_argument("--llava-steps", type=int, default=8)
    parser.add_argument("--dry-run", "--check-args", action="store_true",
                        help="parse, import, build the configs; print the runs; no GPU")
    args = parser.parse_args(argv)
    args.checks = [] if args.throughput_only else [c for c in args.checks.split(",") if c]
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {CHECKS}")
    if args.dry_run:
        return dry_run(args)

    import torch

    from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset

    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_check.py needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu_train_check_")
    tiny_data = os.path.join(work, "tiny", "synthetic")
    preset_data = os.path.join(work, args.preset, "synthetic")
    preset, data_kwargs = PRESETS[args.preset]
    failures = []
    if args.checks:
        write_synthetic_dataset(tiny_data, num_samples=400, image_size=16, max_images=2, text_len=(4, 30))
        failures += check_tiny(tiny_data, work, args.checks)
    throughput = [run for run in planned_runs(args) if run[1] is preset]
    if throughput or args.llava:
        write_synthetic_dataset(preset_data, **data_kwargs)
    ours_rate = None
    for name, settings, extra in throughput:
        records = pretrain(preset_data, os.path.join(work, name), settings, **extra)
        timed = [records[s] for s in sorted(records)[2:]]  # skip warm-up steps (compilation, caches)
        median = lambda key: sorted(r[key] for r in timed)[len(timed) // 2]  # noqa: E731
        cfg = run_config(settings, **extra)
        ours_rate = ours_rate or median("tokens_per_s")
        print(f"throughput ({args.preset}: {cfg.model.llm.num_layers} x {cfg.model.llm.hidden_size} LLM, "
              f"seq {cfg.data.seq_length}, micro {cfg.data.micro_batch_size}, bf16, distributed optimizer, "
              f"attention {extra['model.llm.attention_impl']}{', train.compile' if extra['train.compile'] else ''}): "
              f"{median('tokens_per_s'):,.0f} tokens/s, "
              f"{median('tflops_per_s'):.1f} TFLOP/s, MFU {median('mfu'):.3f} (encoder counted), "
              f"memory {max(r['memory_gb'] for r in timed):.1f} GB")
    if args.llava:
        rate = llava_throughput(run_config(preset), args.llava_steps)
        print(f"transformers Llava + AdamW loop ({args.preset}, bf16 autocast, fp32 weights, fused AdamW): "
              f"{rate:,.0f} tokens/s" + (f"; ours (eager) / it: {ours_rate / rate:.2f}x" if ours_rate else ""))

    for failure in failures:
        print("FAILED:", failure)
    print("gpu_train_check:", "FAILED" if failures else "OK")
    return 1 if failures else 0


def llava_throughput(cfg, steps: int) -> float:
    """Tokens/s of the plain transformers Llava loop (benchmarks/train_throughput.py's) on CUDA:
    fp32 weights, bf16 autocast, fused AdamW, on the preset's batch shape."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_throughput
    from megatron_unihetero.models.vision import load_hf_vision_config, tokens_per_image

    model = train_throughput.build_hf_llava(cfg).cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  fused=True)
    vision = load_hf_vision_config(cfg.model.vision)
    batch = train_throughput.synthetic_batch(cfg, tokens_per_image(cfg.model.vision), vision.image_size)
    tokens, images = batch["tokens"].cuda(), batch["images"].cuda()
    labels = tokens.clone()
    labels[labels == cfg.model.image_token_id] = -100
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, pixel_values=images, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[2:])
    return tokens.numel() / timed[len(timed) // 2]


def check_tiny(tiny_data: str, work: str, checks) -> list:
    failures = []
    straight = pretrain(tiny_data, os.path.join(work, "straight"), TINY)
    print("losses (straight):  ", [round(straight[s]["loss"], 5) for s in sorted(straight)])
    if not straight[6]["loss"] < straight[1]["loss"]:
        failures.append("the tiny run's loss did not go down")
    # bf16 on CUDA: the attention backward may use atomics, so not bitwise; 1e-3 is far below
    # what a lost optimizer state would cost (the first resumed step jumps by ~1e-1).
    if "resume" in checks:
        pretrain(tiny_data, os.path.join(work, "stopped"), TINY, **{"train.steps": 3})
        resumed = pretrain(tiny_data, os.path.join(work, "stopped"), TINY)
        print("losses (resumed):   ", [round(resumed[s]["loss"], 5) for s in sorted(resumed)])
        resume_diff = max_relative_difference(resumed, straight, (4, 5, 6))
        print(f"resume (async saves): max relative loss difference, steps 4-6: {resume_diff:.2e}")
        if resume_diff > 1e-3:
            failures.append(f"resume differs by {resume_diff:.2e}")
    def against_straight(name: str, what: str, tolerance: float, **overrides) -> None:
        """The same tiny run with ``overrides``: its losses against the straight run's."""
        run = pretrain(tiny_data, os.path.join(work, name), TINY, **overrides)
        print(f"losses ({name}):", [round(run[s]["loss"], 5) for s in sorted(run)])
        diff = max_relative_difference(run, straight, range(1, 7))
        print(f"{what}, steps 1-6: {diff:.2e}")
        if diff > tolerance:
            failures.append(f"{what} differ by {diff:.2e}")

    if "replicated" in checks:
        against_straight("replicated", "distributed vs replicated optimizer", 1e-3,
                         **{"parallel.distributed_optimizer": False})
    if "compiled" in checks:
        # Inductor keeps fused bf16 elementwise chains in fp32 (eager rounds after each op).
        against_straight("compiled", "train.compile vs eager", 1e-2, **{"train.compile": True})
    if "export" in checks:
        out = os.path.join(work, "export_hf")
        start = time.perf_counter()
        code = load_tool("convert_checkpoint_to_hf").main(
            ["--load", os.path.join(work, "straight", "ckpt"), "--save", out, "--dtype", "bf16"])
        print(f"export: exit {code}, {time.perf_counter() - start:.1f} s, "
              f"{sorted(os.listdir(out)) if os.path.isdir(out) else 'nothing written'}")
        if code != 0:
            failures.append(f"export exited {code}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
