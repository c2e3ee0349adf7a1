"""Jobs for the trainer tests (module-level so spawned workers can import them)."""

import os

from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset
from megatron_unihetero.testing.runs import run_overrides, train_records


def make_data(folder: str) -> str:
    prefix = os.path.join(folder, "synthetic")
    write_synthetic_dataset(prefix, num_samples=200, image_size=16, max_images=2, text_len=(4, 30))
    return prefix


overrides = run_overrides  # the tiny run's --key=value arguments (megatron_unihetero.testing.runs)


def pretrain_job(args):
    from megatron_unihetero.pretrain import main

    main(args)


def train_losses(run_dir: str) -> dict:
    return {step: record["loss"] for step, record in train_records(run_dir).items()}


def eval_losses(run_dir: str) -> dict:
    return {step: record["valid_loss"] for step, record in train_records(run_dir, kind="valid").items()}


def make_eval_set(folder: str) -> dict:
    """A held-out demo set (8 questions) and the tokenizer it is read with, as the overrides
    that make a tiny run evaluate it at its last step (logging.eval_sets)."""
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(os.path.join(folder, "tok"))  # <image> = 4, 400 ids
    demo = os.path.join(folder, "demo")
    write_demo_data(demo, 16, seed=5, image_size=16, valid_fraction=0.5)
    return {"data.tokenizer": tokenizer, "logging.eval_interval": 6,
            "logging.eval_sets": f"[{{name: demo, path: {demo}, max_rows: 8}}]"}


def pretrain_then_evaluate_job(args, evaluate_argv):
    """Train (``args``), then run evaluate.py's CLI (``evaluate_argv``) in the same process:
    megatron's import is paid once."""
    from megatron_unihetero import evaluate
    from megatron_unihetero.pretrain import main

    main(args)
    assert evaluate.main(evaluate_argv) == 0


def understanding_records(run_dir: str) -> dict:
    return train_records(run_dir, kind="understanding")


def evaluate_argv(run_dir: str, eval_overrides: dict, output: str) -> list:
    """evaluate.py's arguments for ``run_dir``'s last checkpoint on the rows the run scored."""
    demo = eval_overrides["logging.eval_sets"].split("path: ")[1].split(",")[0]
    return ["--load", os.path.join(run_dir, "ckpt"), "--data", demo, "--max-samples", "8",
            "--tokenizer", eval_overrides["data.tokenizer"], "--output", output]


def assert_same_understanding(run_dir: str, evaluated: str) -> None:
    """The run's step-6 understanding record is what evaluate.py gives on its step-6 checkpoint."""
    import json

    record = understanding_records(run_dir)[6]
    with open(evaluated) as handle:
        results = json.load(handle)
    assert results["checkpoint"].endswith("iter_0000006")
    assert record["demo/num_questions"] == results["num_samples"] == 8
    assert record["demo/accuracy"] == results["answer_accuracy"], (record, results)
    assert record["demo/chance_accuracy"] == results["chance_accuracy"]
    assert abs(record["demo/answer_logprob"] - results["answer_logprob"]) <= 1e-4 * abs(results["answer_logprob"])
