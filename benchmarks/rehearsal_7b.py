"""The 7B recipe rehearsed on CPU: ``python benchmarks/rehearsal_7b.py [--work DIR]``.

Builds, with transformers, a Llama-2-7B-shaped folder (hidden 4096, 32 heads without GQA, FFN
11008, untied, max 4096 positions) and a DINOv2-L-shaped one (1024 wide, 16 heads, patch 14,
image_size 518 as released), each with 2 layers and random weights; the Llama folder holds a
SentencePiece tokenizer.model trained on the shapes-world demo data without our special tokens
(Llama-2's case). Then runs the README's 7B commands, each as its own process:

  1. import     tools/convert_hf_to_checkpoint.py --llm --vision --save INIT --image-size 224
                (the folder's tokenizer; the vocabulary grows and is padded to 128 x 8)
  2. preprocess tools/preprocess_data.py with that tokenizer.model at 224 px
  3. train      torchrun, 2 CPU ranks (gloo), examples/configs/paper_7b.yaml at TP=2 with
                2 layers, the import's vocabulary, 224 px, semantic generation on,
                train.recompute=selective, fp32: 3 steps from checkpoint.load=INIT
  4. resume     the same command to step 5 (resumes from the newest checkpoint)
  5. export     tools/convert_checkpoint_to_hf.py
  6. parity     transformers' processor + LlavaForConditionalGeneration on one sample vs our
                model (megatron_unihetero.hf.rehearsal.logits_parity): max |logit diff| < 1e-4

``--dtype bf16``: after 1-2, the training run for 5 steps (and its final save) with bf16 weights and
megatron-core's distributed optimizer (fp32 master weights) and the same 5 steps in fp32, each
its own process tree: both runs' losses and gradient norms and each run's peak memory. The check
is step 1 (the same weights and batch: bf16 forward and backward against fp32), its loss and
gradient norm within ``--bf16-rtol`` (default 2e-2). Later steps are printed, not checked: from a
random initialisation with gradient norms near 100, Adam's first updates (about lr times the
sign of each gradient) turn bf16's rounding of the small gradients into different directions,
and the two runs drift apart (measured 2026-12-07, TP=2: step 1 loss 8.26316 vs 8.26546 and
gradient norm 91.72 vs 91.45, 3e-3; steps 2-5 differ by 18%, 5.2%, 3.1%, 0.3% of the loss).

``--save-formats``: after 1-2, only the training run (3 steps and its final save) once per
optimizer save form (dp_reshardable; fully_reshardable gathering onto DP rank 0 alone,
checkpoint.optimizer_save_low_memory=true, the default; fully_reshardable all-gathering onto
every rank), each a fresh process tree, printing each one's peak resident memory: the
measurement behind the default. ``--tp 1`` runs the 2 ranks as DP=2 (the gather then crosses
ranks; TP=2 is DP=1).

Prints each command's wall time and peak resident memory (the largest process of the command:
os.wait4's ru_maxrss), each training step's time from metrics.jsonl, the total and the logit
difference; exits 1 when the parity fails. About 10-15 minutes and ~12 GB on 2 cores; writes
~10 GB under --work (default: a temporary folder, removed unless --keep).
Not part of the test suite; tests/hf/test_hf_init_path.py runs the same path at a tiny width.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ_LENGTH = 512  # one 224 px image (256 tokens + 2 markers) and its caption fit twice
TIMINGS = []


def run(name: str, argv, env=None) -> None:
    """Run one command; record its wall time and peak RSS (largest process of its tree)."""
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    TIMINGS.append((name, seconds, usage.ru_maxrss / 2**20))  # ru_maxrss is in KiB on Linux
    print(f"== {name}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")


def build_folders(work: str) -> dict:
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.hf.rehearsal import save_dinov2_folder, save_llama_folder, train_plain_sentencepiece

    start = time.perf_counter()
    data = os.path.join(work, "demo")
    write_demo_data(data, 256, seed=0, image_size=64, valid_fraction=0.0)
    parquet = os.path.join(data, "train.parquet")
    spm = train_plain_sentencepiece([parquet], os.path.join(work, "llama_tokenizer.model"), vocab_size=1000)
    llama = save_llama_folder(os.path.join(work, "llama-2-7b-2layers"), spm, hidden_size=4096, num_heads=32,
                              ffn_hidden_size=11008, num_layers=2, max_positions=4096)
    dinov2 = save_dinov2_folder(os.path.join(work, "dinov2-large-2layers"), hidden_size=1024, num_layers=2,
                                num_heads=16, image_size=518, patch_size=14)
    import resource

    TIMINGS.append(("build HF folders", time.perf_counter() - start,
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
    return dict(parquet=parquet, llama=llama, dinov2=dinov2, data=data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--tp", type=int, default=2, choices=[1, 2], help="tensor parallel size of the 2 ranks")
    p.add_argument("--save-formats", action="store_true",
                   help="only train + save once per optimizer save form, and compare their peak memory")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: 5 steps in bf16 against the same 5 in fp32 (losses and peak memory)")
    p.add_argument("--bf16-rtol", type=float, default=2e-2)
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="rehearsal_7b_")
    os.makedirs(work, exist_ok=True)
    total = time.perf_counter()
    try:
        return _rehearse(work, args.tp, args.save_formats, args.dtype, args.bf16_rtol)
    finally:
        print(f"\ntotal: {time.perf_counter() - total:.1f} s")
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


SAVE_FORMATS = {  # name -> the options that select it
    "dp_reshardable": ["--checkpoint.optimizer_format=dp_reshardable"],
    "fully_reshardable, gather on rank 0": ["--checkpoint.optimizer_format=fully_reshardable",
                                            "--checkpoint.optimizer_save_low_memory=true"],
    "fully_reshardable, all-gather": ["--checkpoint.optimizer_format=fully_reshardable",
                                      "--checkpoint.optimizer_save_low_memory=false"],
}


def _losses(run_dir: str) -> dict:
    """{step: (loss, grad_norm)} from the run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r.get("kind") == "train"}


def _rehearse(work: str, tp: int = 2, save_formats: bool = False, dtype: str = "fp32",
              bf16_rtol: float = 2e-2) -> int:
    import torch

    py = sys.executable
    f = build_folders(work)
    init, shards, run_dir = (os.path.join(work, n) for n in ("init_ckpt", "shards/pairs", "run"))
    tokenizer = os.path.join(f["llama"], "tokenizer.model")

    run("import", [py, "tools/convert_hf_to_checkpoint.py", "--llm", f["llama"], "--vision", f["dinov2"],
                   "--save", init, "--image-size", "224"])
    from megatron_unihetero.hf.importer import training_settings

    settings = training_settings(init)
    run("preprocess", [py, "tools/preprocess_data.py", "--input", f["parquet"], "--output-prefix", shards,
                       "--tokenizer-model", tokenizer, "--image-size", "224", "--workers", "2",
                       "--no-progress"])

    # paper_7b.yaml as written, but 2 layers, the import's tokenizer-derived values, CPU sizes.
    train = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "megatron_unihetero.pretrain",
             "--config", "examples/configs/paper_7b.yaml",
             "--model.llm.num_layers=2", "--model.llm.transformer_impl=local",
             *(f"--{k}={v}" for k, v in settings.items()),
             f"--data.train=[{shards}]", f"--data.seq_length={SEQ_LENGTH}", "--data.num_workers=0",
             "--data.pack_window=64", f"--parallel.tensor_parallel={tp}", "--parallel.timeout_minutes=20",
             "--train.recompute=selective", "--train.warmup_steps=1",
             "--train.grad_accumulation=1",
             f"--checkpoint.load={init}",
             "--checkpoint.save_interval=0", "--checkpoint.keep_last=1",
             "--logging.log_interval=1", "--logging.eval_interval=0", "--logging.tensorboard=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    setup = len(TIMINGS)  # the folders, the import and the preprocessing
    if dtype == "bf16":
        runs = {}
        for run_dtype in ("bf16", "fp32"):
            folder = os.path.join(work, f"run_{run_dtype}")
            run(f"train 5 steps, {run_dtype}", train + [f"--train.dtype={run_dtype}", "--train.steps=5",
                                                        "--parallel.distributed_optimizer=true",
                                                        f"--checkpoint.dir={folder}/checkpoints",
                                                        f"--logging.dir={folder}"], env)
            runs[run_dtype] = _losses(folder)
            shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
        print(f"\n-- 2 ranks at TP={tp}, distributed optimizer; loss (gradient norm) per step:")
        for step in sorted(runs["fp32"]):
            (b_loss, b_norm), (f_loss, f_norm) = runs["bf16"][step], runs["fp32"][step]
            print(f"   step {step}: bf16 {b_loss:.5f} ({b_norm:.4g})   fp32 {f_loss:.5f} ({f_norm:.4g})   "
                  f"loss differs by {abs(b_loss - f_loss) / abs(f_loss):.2%}")
        for name, seconds, gib in TIMINGS[setup:]:
            print(f"   {name:28s} {seconds:7.1f} s   peak RSS {gib:6.2f} GiB")
        (b_loss, b_norm), (f_loss, f_norm) = runs["bf16"][1], runs["fp32"][1]
        first = max(abs(b_loss - f_loss) / abs(f_loss), abs(b_norm - f_norm) / abs(f_norm))
        ok = first < bf16_rtol
        print(f"-- step 1, bf16 against fp32: largest relative difference of loss and gradient norm "
              f"{first:.2e} ({'OK' if ok else 'FAILED'}: < {bf16_rtol})")
        return 0 if ok else 1
    train.append("--train.dtype=fp32")
    if save_formats:
        for k, (name, options) in enumerate(SAVE_FORMATS.items()):
            folder = os.path.join(work, f"run_format{k}")
            try:
                run(f"train+save: {name}", train + options + [f"--checkpoint.dir={folder}/checkpoints",
                                                              f"--logging.dir={folder}", "--train.steps=3"], env)
            except SystemExit as failed:  # e.g. a rank killed for memory: the finding, not the end
                print(f"== {name}: {failed}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        print(f"\n-- peak RSS of the largest rank, 3 steps + one save, 2 ranks at TP={tp} (DP={2 // tp}):")
        for name, seconds, gib in TIMINGS[setup:]:
            print(f"   {name:48s} {seconds:7.1f} s   peak RSS {gib:6.2f} GiB")
        return 0
    # the project's default optimizer save (dp_reshardable)
    train += [f"--checkpoint.dir={run_dir}/checkpoints", f"--logging.dir={run_dir}"]
    run(f"train (steps 1-3, TP={tp})", train + ["--train.steps=3"], env)
    run("resume (steps 4-5)", train + ["--train.steps=5"], env)
    hf_dir = os.path.join(work, "hf_export")
    run("export", [py, "tools/convert_checkpoint_to_hf.py", "--load", f"{run_dir}/checkpoints", "--save", hf_dir])

    from PIL import Image

    from megatron_unihetero.data.demo_world import make_sample
    from megatron_unihetero.hf.rehearsal import logits_parity
    from megatron_unihetero.training import checkpoint as ckpt

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    sample = make_sample(7, 0, image_size=64)
    iter_dir = ckpt.latest_iteration_dir(f"{run_dir}/checkpoints")
    result = logits_parity(iter_dir, hf_dir, Image.open(io.BytesIO(sample["image"])).convert("RGB"),
                           " " + sample["caption"])
    import resource

    TIMINGS.append(("parity (HF Llava vs ours)", time.perf_counter() - start,
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))

    print("\n-- settings the import derived:", json.dumps(settings))
    print("-- training steps (metrics.jsonl):")
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("kind") == "train":
                print(f"   step {record['step']}: {record['step_time_s']:.1f} s, loss {record['loss']:.3f}, "
                      f"RSS of the logging rank {record['memory_gb']:.2f} GiB")
    print("-- commands:")
    for name, seconds, gib in TIMINGS:
        print(f"   {name:28s} {seconds:7.1f} s   peak RSS {gib:6.2f} GiB")
    print(f"-- {iter_dir}: {result['seq_len']} positions, {result['num_image_tokens']} image tokens; "
          f"max |logits ours - HF Llava| = {result['max_abs_diff']:.3g} (max |logit| "
          f"{result['max_abs_logit']:.3g})")
    ok = result["max_abs_diff"] < 1e-4
    print("PARITY OK" if ok else "PARITY FAILED (> 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
