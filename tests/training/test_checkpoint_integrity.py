"""Checkpoint manifests: written with every checkpoint, verified before a resume, and a damaged
newest checkpoint makes the run fall back to the newest one that verifies."""

import json
import os

import pytest

from megatron_unihetero.testing import run_distributed_test, run_in_fresh_process
from megatron_unihetero.training import checkpoint as ckpt

from tests.training import _integrity_jobs as integrity_jobs
from tests.training import _train_jobs as jobs

MODEL_FILE = "dist/__0_0.distcp"


def fake_checkpoint(ckpt_dir: str, step: int, manifest: bool = True) -> str:
    """An iteration folder with a few files of distinct content, like the trainer's layout."""
    iter_dir = ckpt.iteration_dir(ckpt_dir, step)
    os.makedirs(os.path.join(iter_dir, "dist"), exist_ok=True)
    os.makedirs(os.path.join(iter_dir, "engine"), exist_ok=True)
    for rel, size in ((MODEL_FILE, 4096), ("dist/.metadata", 40), ("engine/optim.pt", 1000),
                      ("trainer.pt", 300), ("config.yaml", 20)):
        with open(os.path.join(iter_dir, rel), "wb") as handle:
            handle.write(bytes((step * 7 + i) % 251 for i in range(size)))
    if manifest:
        ckpt.write_manifest(iter_dir)
    ckpt.mark_latest(ckpt_dir, iter_dir)
    return iter_dir


def truncate(path: str, keep: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def flip_byte(path: str, offset: int = 10) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


# -- write / verify ------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    iter_dir = fake_checkpoint(str(tmp_path), 3)
    with open(os.path.join(iter_dir, ckpt.MANIFEST)) as handle:
        manifest = json.load(handle)
    assert manifest["iteration"] == "iter_0000003" and manifest["checksum"] == "sha256"
    assert sorted(manifest["files"]) == sorted(["config.yaml", "engine/optim.pt", "dist/.metadata",
                                                MODEL_FILE, "trainer.pt"])
    assert manifest["files"][MODEL_FILE]["size"] == 4096
    assert ckpt.manifest_problems(iter_dir, "full") == []
    assert ckpt.verify_checkpoint(iter_dir) is True


def test_a_truncated_file_fails_with_its_sizes(tmp_path):
    iter_dir = fake_checkpoint(str(tmp_path), 3)
    truncate(os.path.join(iter_dir, MODEL_FILE))
    for mode in ("sizes", "full"):
        assert ckpt.manifest_problems(iter_dir, mode) == [
            f"iter_0000003/{MODEL_FILE}: size 100, manifest says 4096"]
    with pytest.raises(ckpt.CheckpointError, match=f"iter_0000003/{MODEL_FILE}: size 100"):
        ckpt.verify_checkpoint(iter_dir, "sizes")


def test_a_flipped_byte_fails_the_checksum_only(tmp_path):
    iter_dir = fake_checkpoint(str(tmp_path), 3)
    flip_byte(os.path.join(iter_dir, "engine/optim.pt"))
    assert ckpt.manifest_problems(iter_dir, "sizes") == []
    problems = ckpt.manifest_problems(iter_dir, "full")
    assert len(problems) == 1 and "iter_0000003/engine/optim.pt: sha256 checksum mismatch" in problems[0]


def test_a_missing_file_and_a_missing_or_broken_manifest_are_named(tmp_path):
    iter_dir = fake_checkpoint(str(tmp_path), 3)
    os.remove(os.path.join(iter_dir, "trainer.pt"))
    assert ckpt.manifest_problems(iter_dir) == ["iter_0000003/trainer.pt: missing (the manifest lists 300 bytes)"]
    # Files the manifest does not list (a later load's converted state) are no problem.
    fake_checkpoint(str(tmp_path), 3)
    with open(os.path.join(iter_dir, "engine", "extra.bin"), "wb") as handle:
        handle.write(b"x")
    assert ckpt.manifest_problems(iter_dir) == []

    bare = fake_checkpoint(str(tmp_path), 5, manifest=False)
    assert "iter_0000005/manifest.json is missing" in ckpt.manifest_problems(bare)[0]
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is missing"):
        ckpt.verify_checkpoint(bare)
    assert ckpt.verify_checkpoint(bare, require_manifest=False) is False  # older: accepted, unverified
    with open(os.path.join(iter_dir, ckpt.MANIFEST), "w") as handle:
        handle.write("{not json")
    assert "iter_0000003/manifest.json is unreadable" in ckpt.manifest_problems(iter_dir)[0]


# -- choosing the checkpoint to resume from ------------------------------------------------------
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    ckpt_dir = str(tmp_path)
    fake_checkpoint(ckpt_dir, 2)
    fake_checkpoint(ckpt_dir, 3, manifest=False)
    newest = fake_checkpoint(ckpt_dir, 4)
    assert ckpt.resume_candidate(ckpt_dir) == (newest, None)
    truncate(os.path.join(newest, MODEL_FILE))
    path, note = ckpt.resume_candidate(ckpt_dir, "full", fallback=True)
    assert path == ckpt.iteration_dir(ckpt_dir, 2)
    assert note.startswith(f"iter_0000004 failed verification (iter_0000004/{MODEL_FILE}: size 100, "
                           f"manifest says 4096); iter_0000003 failed verification (")
    assert note.endswith("; resuming from iter_0000002")
    with pytest.raises(ckpt.CheckpointError, match=f"iter_0000004/{MODEL_FILE}: size 100, manifest says 4096"):
        ckpt.resume_candidate(ckpt_dir, "full", fallback=False)
    # The run's own folder: `latest` moves back to the checkpoint resumed from.
    assert ckpt.agree_on_resume(ckpt_dir, "full", True, repoint=True) == ckpt.iteration_dir(ckpt_dir, 2)
    assert ckpt.latest_iteration_dir(ckpt_dir) == ckpt.iteration_dir(ckpt_dir, 2)


def test_no_verified_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt_dir = str(tmp_path)
    fake_checkpoint(ckpt_dir, 2, manifest=False)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies.*manifest.json is missing"):
        ckpt.resume_candidate(ckpt_dir)
    os.makedirs(tmp_path / "fresh")
    assert ckpt.resume_candidate(str(tmp_path / "fresh")) == (None, None)  # no `latest`: a new run


def test_every_rank_takes_rank_zeros_decision(tmp_path):
    ckpt_dir = str(tmp_path)
    fake_checkpoint(ckpt_dir, 2)
    truncate(os.path.join(fake_checkpoint(ckpt_dir, 4), MODEL_FILE))
    run_distributed_test(integrity_jobs.agree_job, 2, ckpt_dir, True, ckpt.iteration_dir(ckpt_dir, 2))
    run_distributed_test(integrity_jobs.agree_job, 2, ckpt_dir, False, "error")


# -- pruning -------------------------------------------------------------------------------------
def test_prune_counts_verified_checkpoints_and_keeps_latest(tmp_path):
    ckpt_dir = str(tmp_path)
    for step in (1, 2, 3):
        fake_checkpoint(ckpt_dir, step)
    fake_checkpoint(ckpt_dir, 4, manifest=False)
    truncate(os.path.join(fake_checkpoint(ckpt_dir, 5), MODEL_FILE))
    # `latest` names the damaged iter 5: kept; 4 and 5 do not count, so 3 and 2 stay too.
    assert sorted(ckpt.prune(ckpt_dir, keep_last=2)) == ["iter_0000001", "iter_0000004"]
    assert ckpt.iteration_names(ckpt_dir) == ["iter_0000005", "iter_0000003", "iter_0000002"]
    ckpt.mark_latest(ckpt_dir, ckpt.iteration_dir(ckpt_dir, 2))
    assert ckpt.prune(ckpt_dir, keep_last=1) == ["iter_0000005"]
    assert ckpt.iteration_names(ckpt_dir) == ["iter_0000003", "iter_0000002"]


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


def _pretrain(args):
    """pretrain.main in a new process (a forkserver worker): its exit code and its output,
    stdout and stderr together."""
    return run_in_fresh_process(jobs.pretrain_job, args, timeout_s=600, stderr_to_stdout=True)


def test_a_truncated_model_file_resumes_from_the_previous_checkpoint(data_prefix, tmp_path):
    """The first run only writes the checkpoints (a failure raises); the two resumes are
    processes of their own, for their exit codes and what they print (forkserver workers, as
    the first run: until now each was a ``python -m megatron_unihetero.pretrain`` process,
    whose exit code is main's SystemExit all the same)."""
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **{"train.steps": 4, "checkpoint.save_interval": 2})
    run_distributed_test(jobs.pretrain_job, 1, args)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    assert ckpt.iteration_names(ckpt_dir) == ["iter_0000004", "iter_0000002"]
    for name in ckpt.iteration_names(ckpt_dir):
        assert ckpt.manifest_problems(os.path.join(ckpt_dir, name), "full") == []
    damaged = os.path.join(ckpt_dir, "iter_0000004", MODEL_FILE)
    size = os.path.getsize(damaged)
    truncate(damaged, 5)

    strict = _pretrain(args + ["--checkpoint.fallback=false"])
    assert strict.returncode == 4  # pretrain: no checkpoint to resume from verifies
    assert f"iter_0000004/{MODEL_FILE}: size 5, manifest says {size}" in strict.stdout, strict.stdout

    resumed = _pretrain(args)
    assert resumed.returncode == 0, resumed.stdout
    assert (f"iter_0000004 failed verification (iter_0000004/{MODEL_FILE}: size 5, manifest says "
            f"{size}); resuming from iter_0000002") in resumed.stdout, resumed.stdout
    assert "at step 2" in resumed.stdout
    assert ckpt.latest_iteration_dir(ckpt_dir) == os.path.join(ckpt_dir, "iter_0000004")
    assert ckpt.manifest_problems(os.path.join(ckpt_dir, "iter_0000004"), "full") == []
