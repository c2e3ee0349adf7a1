"""The periodic console line (training/metrics.py): step out of the total, an ETA from a smoothed
step time, and lines written above the progress bar, never into it."""

import io
import re
import sys

import pytest

from megatron_unihetero.training import metrics
from megatron_unihetero.training.config import LoggingConfig


def _logger(tmp_path, total=200, **cfg):
    cfg = LoggingConfig(dir=str(tmp_path), tensorboard=False, **dict({"log_interval": 1}, **cfg))
    return metrics.MetricsLogger(cfg, enabled=True, total_steps=total)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_format_duration():
    assert metrics.format_duration(0) == "0:00"
    assert metrics.format_duration(59.6) == "1:00"
    assert metrics.format_duration(754) == "12:34"
    assert metrics.format_duration(3 * 3600 + 5) == "3:00:05"
    assert metrics.format_duration(None) == "?"
    assert metrics.format_duration(float("inf")) == "?"


def test_the_line_carries_step_out_of_total_and_an_eta(tmp_path, capsys, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    log = _logger(tmp_path, total=200, log_interval=10)
    # Step 1 is slow (warm-up): 30 s; the ETA after it is its time x what is left.
    log.log_step(1, {"loss": 2.0, "step_time_s": 30.0})
    first = capsys.readouterr().out.strip()
    assert first == "[megatron_unihetero] step 1/200 | eta 1:39:30 | loss 2", first
    # From then on the wall time between calls (2 s a step), the first step's time replaced.
    for step in range(2, 11):
        clock.now += 2.0
        log.log_step(step, {"loss": 1.0, "step_time_s": 1.5})
    line = capsys.readouterr().out.strip()
    assert line == "[megatron_unihetero] step 10/200 | eta 6:20 | loss 1", line
    # A slow stretch (an evaluation, a save) moves the smoothed time, a little.
    clock.now += 12.0
    log.log_step(11, {"loss": 1.0, "step_time_s": 1.5})
    assert log.step_time == pytest.approx(2.0 + metrics.ETA_SMOOTHING * (12.0 - 2.0))
    assert log.eta_seconds(11) == pytest.approx(189 * log.step_time)
    assert log.eta_seconds(200) == 0.0


class _Terminal(io.StringIO):
    """stdout and stderr of one terminal: the bar (stderr) and the lines (stdout) interleave."""

    def isatty(self):
        return True


def test_lines_are_written_above_the_progress_bar_not_into_it(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    log = _logger(tmp_path, total=5, log_interval=2)
    assert log.bar is not None
    for step in range(1, 6):
        log.log_step(step, {"loss": 1.0, "step_time_s": 0.1})
    log.info("saved checkpoint x")
    log.close()
    text = terminal.getvalue()
    starts = [m.start() for m in re.finditer(re.escape("[megatron_unihetero]"), text)]
    assert len(starts) == 4  # steps 1, 2, 4 and the info line
    for start in starts:
        # Each line begins a terminal line: after a newline or the bar's clearing carriage
        # return, never after the bar's own text.
        assert start == 0 or text[start - 1] in "\r\n", repr(text[max(0, start - 80):start + 40])
        assert text.find("\n", start) != -1
        line = text[start:text.index("\n", start)]
        assert "%|" not in line and "it/s" not in line, repr(line)


def test_without_a_terminal_there_is_no_bar_and_lines_are_printed(tmp_path, capsys):
    log = _logger(tmp_path, total=3)
    assert log.bar is None
    log.log_step(1, {"loss": 1.0, "step_time_s": 0.5})
    assert capsys.readouterr().out.startswith("[megatron_unihetero] step 1/3 | eta 0:01 | loss 1")
