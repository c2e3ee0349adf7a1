"""Faults a long run meets, injected on CPU: kills (also mid-save), a full disk, a hung rank, the
exit signal and a deadline (a requeue), a rank killed under torchrun (a restart in the job).

Each faulty run is the tiny pretraining run (megatron_unihetero.testing.runs) with a checkpoint
every 2 steps, in its own process where the test needs one (kills, torchrun) and in workers of
megatron_unihetero.testing's forkserver otherwise; the reference is the same run without a
fault (one rank, and two), in the forkserver.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.testing.distributed import free_port
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.stopping import EXIT_REQUEUE

from tests.faults import _fault_jobs as faults
from tests.training import _train_jobs as jobs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAVE_EVERY = {"checkpoint.save_interval": 2}


def _command(fault: str, args, ranks: int = 1, torchrun=()) -> list:
    job = ["-m", "tests.faults._fault_jobs", fault, *args]
    if ranks == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-port", str(free_port()), *torchrun, *job]


def _run(fault: str, args, ranks: int = 1, timeout: int = 300, torchrun=()) -> subprocess.CompletedProcess:
    """Run to the end; the output goes through a file, not a pipe: a process killed mid-save
    can leave a helper of megatron's writer behind holding its stdout, and waiting for a pipe
    to close would wait for that helper."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.run(_command(fault, args, ranks, torchrun), cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        log.seek(0)
        proc.stdout = log.read()
    return proc


def _latest(run_dir: str) -> str:
    return os.path.basename(ckpt.latest_iteration_dir(os.path.join(run_dir, "ckpt")) or "none")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def straight_run(data_prefix, tmp_path_factory):
    """The reference: the same run without a fault. Nothing about it needs a process of its
    own, so it runs as a worker of the preloaded forkserver (megatron_unihetero.testing)."""
    run_dir = str(tmp_path_factory.mktemp("straight"))
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, run_dir, **SAVE_EVERY))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(straight_run):
    return jobs.train_losses(straight_run)


PROFILED = {"logging.profile_steps": "[2,3]", "logging.profile_ranks": "[0,1]"}


@pytest.fixture(scope="module")
def straight_2ranks(data_prefix, tmp_path_factory):
    """The reference of the 2-rank faults (DP=2), in the forkserver too; steps 2-3 profiled on
    both ranks (test_the_time_breakdown_... reads them; profiling leaves the losses alone)."""
    run_dir = str(tmp_path_factory.mktemp("straight2"))
    run_distributed_test(jobs.pretrain_job, 2, jobs.overrides(data_prefix, run_dir, **SAVE_EVERY, **PROFILED))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_2ranks(straight_2ranks):
    run_dir = straight_2ranks
    return jobs.train_losses(run_dir)


def _kill_at_a_random_step(args, run_dir: str, step: int) -> None:
    """SIGKILL from outside once ``step`` (or a later one) is logged by this process (whatever
    the run is doing then)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    seen = _logged(run_dir)  # records of earlier processes in the same folder
    proc = subprocess.Popen(_command("none", args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as handle:
                lines = [line for line in handle if line.strip()][len(seen):]
            if any(json.loads(line).get("step", 0) >= step for line in lines):
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _logged(run_dir: str) -> list:
    """Every training record in the folder's metrics.jsonl, each process's, in order."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        return []
    with open(metrics) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_kill_9_at_three_points_resumes_with_the_losses_of_an_uninterrupted_run(
        data_prefix, uninterrupted, tmp_path):
    """A random step (from outside), mid-write of the tensor files, and after every file but
    before the commit: one run folder, killed at each point in turn; each time the same
    command resumes it (the next kill lands in that resumed process), and every step any of
    these processes logged has the loss of the run that was never interrupted; the last
    resume ends at step 6 with a verified checkpoint.

    Carries the assertions of the former version, which ran each kill point in a folder of
    its own and resumed each to the end (6 processes, now 4): the mid-save kills leave the
    previous checkpoint as latest and the killed one without a manifest; each resume's losses
    equal the uninterrupted run's (here checked on every record logged, each process's);
    latest ends at iter_0000006 and verifies. The mid-save kills hit the first save the
    resumed process makes (step 4, or 2 / 6 when the outside kill left no checkpoint / step 4)."""
    seed = random.randrange(10**6)
    step = random.Random(seed).choice([1, 3, 5])
    run_dir = str(tmp_path / "run")

    def args(async_save: bool) -> list:
        return jobs.overrides(data_prefix, run_dir, **SAVE_EVERY,
                              **{"checkpoint.async_save": str(async_save).lower()})

    def check_losses(point: str, first: int) -> None:
        records = [r for r in _logged(run_dir) if r.get("kind") == "train"][first:]
        assert records, (point, "the resumed process logged no step")
        for record in records:
            assert record["loss"] == pytest.approx(uninterrupted[record["step"]], rel=1e-6), (
                point, record["step"], f"seed {seed}")

    # The kill from outside hits a run that saves asynchronously (its writer is a forked
    # process: the kill may land while it writes); the two mid-save kills, synchronous ones.
    _kill_at_a_random_step(args(True), run_dir, step)
    check_losses(f"outside@{step}", 0)
    kept = _latest(run_dir)  # none, or iter_0000002 / iter_0000004 as far as the kill let it come
    save_step = 2 if kept == "none" else ckpt.iteration_step(kept) + 2
    for kind in ("kill_mid_write", "kill_before_commit"):
        point = f"{kind}@{save_step}"
        first = len([r for r in _logged(run_dir) if r.get("kind") == "train"])
        killed = _run(point, args(False))  # the same command again (a fault waits at its save)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout[-3000:])
        check_losses(point, first)
        # Killed mid-save: the checkpoint of save_step is not committed; latest is unchanged.
        assert _latest(run_dir) == kept, point
        assert not os.path.exists(os.path.join(run_dir, "ckpt", f"iter_{save_step:07d}", ckpt.MANIFEST))
    first = len([r for r in _logged(run_dir) if r.get("kind") == "train"])
    resumed = _run("none", args(False))  # the same command again, without a fault
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    check_losses("resumed", first)
    losses = jobs.train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for s in losses:
        assert losses[s] == pytest.approx(uninterrupted[s], rel=1e-6), (s, f"seed {seed}")
    assert _latest(run_dir) == "iter_0000006"
    assert ckpt.manifest_problems(os.path.join(run_dir, "ckpt", "iter_0000006")) == []


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(data_prefix, tmp_path, async_save):
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **SAVE_EVERY,
                          **{"checkpoint.async_save": str(async_save).lower()})
    failed = _run("enospc@4", args)
    assert failed.returncode == 4, failed.stdout[-3000:]
    assert "writing checkpoint" in failed.stdout and "iter_0000004" in failed.stdout, failed.stdout[-3000:]
    assert "No space left on device" in failed.stdout
    assert _latest(run_dir) == "iter_0000002"
    assert ckpt.manifest_problems(os.path.join(run_dir, "ckpt", "iter_0000002")) == []


def test_a_hung_rank_ends_the_run_with_the_operation_named(data_prefix, tmp_path):
    """Rank 1 stalls before step 3: rank 0's next collective times out after
    parallel.timeout_minutes (3 s here) and the run stops with exit code 5, saying where."""
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **{"parallel.timeout_minutes": 0.05,
                                                   "checkpoint.save_interval": 0})
    start = time.time()
    done = _run("stall@3", args, ranks=2)
    assert done.returncode != 0
    assert "rank 0: a collective failed while running train step 3" in done.stdout, done.stdout[-4000:]
    assert "timeout_minutes=0.05" in done.stdout
    assert time.time() - start < 200  # it ended; it did not wait for the stalled rank's sleep


class _Payload:
    """Unpickling it creates ``path``: the marker of code that ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled_files(iter_dir: str) -> list:
    """The files of a checkpoint that torch or megatron-core unpickle: torch.save archives
    (their data.pkl) and plain pickles (DCP's .metadata)."""
    import zipfile

    found = []
    for root, _, names in os.walk(iter_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                plain_pickle = handle.read(1) == b"\x80"
            if (plain_pickle or zipfile.is_zipfile(path)) and not name.endswith(".distcp"):
                found.append(os.path.relpath(path, iter_dir))
    return sorted(found)


def test_a_payload_planted_in_any_pickled_file_is_refused_by_resume_export_and_evaluate(
        data_prefix, straight_run, tmp_path, capsys):
    """Resume (the same pretrain command, its own process), export and evaluation of a
    checkpoint whose pickled files were replaced by a __reduce__ payload (and the manifest
    rewritten, as whoever planted it would): each ends with the CheckpointError naming the
    file; no marker appears. (.distcp files hold raw tensor bytes, read weights-only by DCP.)"""
    import pickle
    import shutil

    import torch

    from megatron_unihetero import evaluate
    from megatron_unihetero.testing.distributed import run_in_fresh_process
    from megatron_unihetero.testing.tools import load_tool

    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(str(tmp_path))  # the run trained on token ids alone
    source = os.path.join(straight_run, "ckpt", "iter_0000006")
    pickled = _pickled_files(source)
    assert pickled == ["dist/.metadata", "dist/common.pt", "trainer.pt"]
    marker = tmp_path / "marker"
    for rel in pickled:
        run_dir = str(tmp_path / rel.replace("/", "_"))
        iter_dir = os.path.join(run_dir, "ckpt", "iter_0000006")
        shutil.copytree(source, iter_dir)
        ckpt.mark_latest(os.path.join(run_dir, "ckpt"), iter_dir)
        target = os.path.join(iter_dir, rel)
        if rel.endswith(".pt"):
            torch.save({"step": 6, "x": _Payload(marker)}, target)
        else:
            with open(target, "wb") as handle:
                pickle.dump(_Payload(marker), handle)
        ckpt.write_manifest(iter_dir)
        expected = f"{target} "

        resumed = run_in_fresh_process(jobs.pretrain_job, jobs.overrides(data_prefix, run_dir, **SAVE_EVERY),
                                       stderr_to_stdout=True)
        assert resumed.returncode == 4, (rel, resumed.stdout[-3000:])
        assert expected in resumed.stdout and "refers to io.open" in resumed.stdout, (rel, resumed.stdout[-3000:])
        assert "Traceback" not in resumed.stdout, rel
        if rel.startswith("dist/"):  # what export and evaluation read (trainer.pt they do not)
            out = str(tmp_path / "hf")
            assert load_tool("convert_checkpoint_to_hf").main(["--load", run_dir + "/ckpt", "--save", out,
                                                               "--tokenizer", tokenizer]) == 2
            err = capsys.readouterr().err
            assert expected in err and "refers to io.open" in err and not os.path.exists(out), rel
            with pytest.raises(SystemExit) as exit_info:
                evaluate.main(["--load", iter_dir, "--data", str(tmp_path / "unused.tsv"), "--tokenizer", tokenizer])
            assert exit_info.value.code == 2 and expected in capsys.readouterr().err, rel
        assert not marker.exists(), rel


def _requeue_record(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "ckpt", ckpt.REQUEUE)) as handle:
        return json.load(handle)


def test_the_exit_signal_on_one_rank_and_a_deadline_stop_save_and_requeue(
        data_prefix, uninterrupted_2ranks, tmp_path, monkeypatch):
    """Two ranks, one run folder, the same command three times: (1) rank 1 alone gets SIGUSR1
    during step 3: both ranks stop after step 3 (one all-reduced flag), save it and exit with
    the requeue status 75, requeue.json naming the step and the signal; (2) the job's end time
    from Slurm (SLURM_JOB_END_TIME) has passed: the run stops after its first step, 4, the same
    way; (3) the run ends at step 6. Every step is logged once, with the loss of the run that
    was never stopped, and each resume is a record in metrics.jsonl."""
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **SAVE_EVERY)
    run_distributed_test(faults.requeue_job, 2, "usr1@3", args, EXIT_REQUEUE)
    assert _requeue_record(run_dir)["step"] == 3 and _requeue_record(run_dir)["reason"] == "SIGUSR1"
    assert _latest(run_dir) == "iter_0000003"
    assert ckpt.manifest_problems(os.path.join(run_dir, "ckpt", "iter_0000003")) == []

    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time())))
    run_distributed_test(faults.requeue_job, 2, "none", args, EXIT_REQUEUE)
    record = _requeue_record(run_dir)
    assert record["step"] == 4 and "SLURM_JOB_END_TIME" in record["reason"], record
    assert record["checkpoint"].endswith("iter_0000004")
    monkeypatch.delenv("SLURM_JOB_END_TIME")

    run_distributed_test(jobs.pretrain_job, 2, args)
    assert not os.path.exists(os.path.join(run_dir, "ckpt", ckpt.REQUEUE))
    assert _latest(run_dir) == "iter_0000006"
    logged = _logged(run_dir)
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert r["loss"] == pytest.approx(uninterrupted_2ranks[r["step"]], rel=1e-6), r["step"]
    resumes = [(r["step"], os.path.basename(r["checkpoint"]), r["restart_count"])
               for r in logged if r["kind"] == "resume"]
    assert resumes == [(3, "iter_0000003", 0), (4, "iter_0000004", 0)]


def test_a_rank_killed_under_torchrun_restarts_the_job_from_the_newest_checkpoint(
        data_prefix, uninterrupted_2ranks, tmp_path):
    """torchrun --max-restarts=1, 2 ranks (static rendezvous; the launch scripts' c10d one keeps
    its store across tries the same way): rank 1 is SIGKILLed as step 4 begins (the last
    checkpoint is step 2's); torchrun restarts both ranks, which resume from step 2 and end at
    step 6 with the losses of the run that was never killed. The restart is a record in
    metrics.jsonl (restart_count 1), and TensorBoard, written by both tries into one folder,
    shows each step once: the second try's, purging the first try's step 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **SAVE_EVERY, **{"logging.tensorboard": "true"})
    # (torchrun keeps its store across tries: parallel.init_distributed gives each try a prefix
    # of its own, or the second try's gloo would connect to the first try's dead ranks.)
    done = _run("sigkill@4", args, ranks=2, torchrun=["--max-restarts=1"])
    assert done.returncode == 0, done.stdout[-4000:]
    assert "torchrun restart 1 of at most 1" in done.stdout, done.stdout[-4000:]
    logged = _logged(run_dir)
    train = [r["step"] for r in logged if r["kind"] == "train"]
    assert train == [1, 2, 3, 3, 4, 5, 6], train  # step 3 by both tries
    resumes = [r for r in logged if r["kind"] == "resume"]
    assert [(r["step"], os.path.basename(r["checkpoint"]), r["restart_count"]) for r in resumes] \
        == [(2, "iter_0000002", 1)]
    losses = jobs.train_losses(run_dir)
    for step in range(1, 7):
        assert losses[step] == pytest.approx(uninterrupted_2ranks[step], rel=1e-6), step
    assert _latest(run_dir) == "iter_0000006"

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    for e in scalars:
        assert e.value == pytest.approx(uninterrupted_2ranks[e.step], rel=1e-5), e.step


def test_the_time_breakdown_the_slowest_rank_and_a_profile_window_are_logged(straight_2ranks):
    """metrics.jsonl: each step's phases (data, forward_backward, optimizer; the save after
    step 2 in step 3's record), the slowest rank at every log interval; the profile window
    (steps 2-3, both ranks) wrote torch.profiler traces (Chrome trace JSON: TensorBoard's
    profiler plugin and Perfetto read it) and each rank's peak memory."""
    records = jobs.train_records(straight_2ranks)
    for step, record in records.items():
        for phase in ("data", "forward_backward", "optimizer"):
            assert record[f"time_{phase}_s"] > 0, (step, phase)
            # each phase is the slowest DP rank's: within the slowest rank's step
            assert record[f"time_{phase}_s"] <= record["slowest_rank_step_s"], (step, phase)
        assert record["slowest_rank"] in (0.0, 1.0)
        assert record["slowest_rank_step_s"] >= record["median_rank_step_s"] > 0
    assert records[3]["time_checkpoint_s"] > 0 and "time_checkpoint_s" not in records[2]
    folder = os.path.join(straight_2ranks, "profile")
    for rank in (0, 1):
        traces = [n for n in os.listdir(folder) if n.startswith(f"rank{rank}.") and n.endswith(".pt.trace.json")]
        assert len(traces) == 1, os.listdir(folder)
        with open(os.path.join(folder, traces[0])) as handle:
            events = json.load(handle)["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert len(steps) == 2, steps
        with open(os.path.join(folder, f"memory_rank{rank}.json")) as handle:
            assert json.load(handle)["peak_rss_gib"] > 0.1
