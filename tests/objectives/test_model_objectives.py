"""Objectives and evaluation on a real (tiny) model: pixel-gradient routing, the EMA
target update, the evaluation runners, the evaluate CLI (with --generate), the
generation diagnostics (eval/diagnostics.py) through the model and the training step, and text
generation with the KV cache against full recompute.

All run in ONE spawned gloo worker (see _jobs.all_model_jobs); each test reports its own job.
"""

import json
import os

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.objectives import _jobs as jobs


@pytest.fixture(scope="module")
def job_results(tmp_path_factory):
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    workdir = tmp_path_factory.mktemp("objectives")
    tokenizer = train_tiny_tokenizer(str(workdir / "tok"))
    path = str(workdir / "results.json")
    run_distributed_test(jobs.all_model_jobs, 1, path, str(workdir), tokenizer, timeout_s=600)
    with open(path) as handle:
        return json.load(handle), workdir


def _assert_passed(job_results, name):
    results, _ = job_results
    assert name in results, f"job {name} did not run"
    if results[name] is not None:
        pytest.fail(f"job {name} failed:\n{results[name]}", pytrace=False)


def test_pixel_gradient_reaches_llm_only_when_shared(job_results):
    _assert_passed(job_results, "routing")


def test_ema_target_update(job_results):
    _assert_passed(job_results, "ema")


def test_eval_runners(job_results):
    _assert_passed(job_results, "runners")


def test_evaluate_cli(job_results):
    _assert_passed(job_results, "evaluate_cli")


def test_diagnostics_through_the_model_and_the_step(job_results):
    _assert_passed(job_results, "diagnostics")


def test_text_generation_with_the_kv_cache_equals_full_recompute(job_results):
    _assert_passed(job_results, "generation")
