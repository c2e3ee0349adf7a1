"""The early stop (training/stopping.py): the deadline, with a faked clock; the signals; the exit
status. (The collective decision in real runs, one rank signalled, the Slurm end time and the
resume: tests/faults/test_fault_tolerance.py.)"""

import os
import signal

import pytest

from megatron_unihetero.training import stopping
from megatron_unihetero.training.config import TrainConfig


class _Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_exit_after_minutes_stops_once_a_step_a_save_and_the_margin_no_longer_fit():
    clock = _Clock()
    policy = stopping.StopPolicy(TrainConfig(exit_after_minutes=10, exit_margin_minutes=1),
                                 clock=clock, environ={})
    assert policy.deadline == clock.now + 600
    clock.now += 600 - 60 - 5 - 1  # a 5 s step and the 60 s margin still fit, with 1 s to spare
    assert policy.agree(step_s=5.0) is None
    policy.note_save(30.0)  # the longest save measured counts too
    policy.note_save(2.0)
    assert policy.save_s == 30.0
    assert policy.agree(step_s=5.0) == "the deadline (train.exit_after_minutes=10) is near"


def test_the_job_end_time_from_slurm_is_a_deadline_and_the_earlier_one_wins():
    clock = _Clock()
    end = clock.now + 120
    policy = stopping.StopPolicy(TrainConfig(exit_after_minutes=60, exit_margin_minutes=0),
                                 clock=clock, environ={"SLURM_JOB_END_TIME": f"{end:.0f}"})
    assert policy.deadline == end and "SLURM_JOB_END_TIME" in policy.deadline_source
    assert policy.agree(step_s=100.0) is None
    clock.now += 30
    assert "SLURM_JOB_END_TIME" in policy.agree(step_s=100.0)
    # No time limit (or nothing usable) in the environment, no exit_after_minutes: no deadline.
    for value in ("", "0", "unlimited", "nan"):
        policy = stopping.StopPolicy(TrainConfig(), clock=clock, environ={"SLURM_JOB_END_TIME": value})
        assert policy.deadline is None and policy.agree(step_s=1e9) is None


@pytest.mark.parametrize("name,sent", [("SIGUSR1", signal.SIGUSR1), ("usr2", signal.SIGUSR2),
                                       ("SIGUSR1", signal.SIGTERM), ("none", signal.SIGTERM)])
def test_the_exit_signal_and_sigterm_ask_for_the_stop(name, sent):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        policy = stopping.StopPolicy(TrainConfig(exit_signal=name), environ={})
        policy.install()
        assert policy.agree(step_s=1.0) is None
        os.kill(os.getpid(), sent)  # the handler runs before the next bytecode
        assert policy.agree(step_s=1.0) == sent.name
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_requeue_status_is_75_but_0_under_torchrun():
    assert stopping.requeue_exit_status({}) == stopping.EXIT_REQUEUE == 75
    # torchrun would count 75 as a failed worker (a restart), and does not pass it on
    assert stopping.requeue_exit_status({"TORCHELASTIC_RUN_ID": "job"}) == 0
    assert stopping.torchrun_restarts({}) == (0, None)
    assert stopping.torchrun_restarts({"TORCHELASTIC_RESTART_COUNT": "2",
                                       "TORCHELASTIC_MAX_RESTARTS": "3"}) == (2, 3)
