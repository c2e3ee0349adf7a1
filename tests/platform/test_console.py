"""Where warnings go (megatron_unihetero/console.py): the run's log file, the console only when verbose,
and nothing of ``warnings`` / ``logging`` changed after the block."""

import logging
import os
import subprocess
import sys
import warnings

from megatron_unihetero import console

PACKAGE = logging.getLogger(console.PACKAGE_LOGGER)


def _state():
    return (warnings.showwarning, list(warnings.filters), list(PACKAGE.handlers), PACKAGE.level,
            list(logging.getLogger().handlers))


class _LibraryWarning(Warning):  # pytest.ini ignores UserWarning
    pass


def test_in_process_the_block_leaves_warnings_and_logging_as_they_were(tmp_path):
    state = _state()
    with console.held_warnings() as held:
        warnings.warn("held", _LibraryWarning)
    with console.RunLog(held) as log:
        log.open(str(tmp_path / "run.log"), verbose=True)
        warnings.warn("inside", _LibraryWarning)
    assert _state() == state
    text = open(tmp_path / "run.log").read()
    assert "held" in text and "inside" in text


# A held import-time warning, one raised before the file is known, one at run time, and this
# package's INFO and WARNING records, in a fresh interpreter (no pytest capture, no root handler:
# as a run sees it). Prints whether warnings / logging were left as they were.
RUN_LOG = """
import logging, sys, warnings
from megatron_unihetero import console
package = logging.getLogger(console.PACKAGE_LOGGER)
def state():
    return (warnings.showwarning, list(warnings.filters), list(package.handlers), package.level,
            list(logging.getLogger().handlers))
before = state()
with console.held_warnings() as held:
    warnings.warn("import-time warning", UserWarning)
with console.RunLog(held) as log:
    warnings.warn("before the file is known", FutureWarning)
    log.open(sys.argv[1], verbose=sys.argv[2] == "1")
    warnings.warn("run-time warning", UserWarning)
    logging.getLogger("megatron_unihetero.some.module").info("an info line")
    logging.getLogger("megatron_unihetero.some.module").warning("our own warning")
print("state", "restored" if state() == before else "changed")
"""
LIBRARY = ("import-time warning", "before the file is known", "run-time warning")


def _run_log(tmp_path, verbose):
    path = str(tmp_path / "logs" / "run.log")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", RUN_LOG, path, "1" if verbose else "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "state restored" in proc.stdout
    with open(path) as handle:
        return handle.read(), proc.stdout + proc.stderr


def test_warnings_go_to_the_file_not_the_console_by_default(tmp_path):
    text, console_text = _run_log(tmp_path, verbose=False)
    for message in LIBRARY + ("an info line", "our own warning"):
        assert message in text, text
    assert "UserWarning: import-time warning" in text and "FutureWarning" in text
    # The libraries' warnings and the INFO line stay off the console; this package's own
    # WARNING records are still shown (as logging's last resort showed them before).
    assert "Warning" not in console_text and not any(m in console_text for m in LIBRARY)
    assert "an info line" not in console_text and "our own warning" in console_text


def test_verbose_shows_them_on_the_console_too(tmp_path):
    text, console_text = _run_log(tmp_path, verbose=True)
    for message in LIBRARY + ("an info line", "our own warning"):
        assert message in text and message in console_text, (text, console_text)
    assert "UserWarning: import-time warning" in console_text


def test_warnings_of_a_block_that_never_opened_the_file_are_dropped(capfd):
    state = _state()
    with console.RunLog():
        warnings.warn("never written", UserWarning)
    assert "never written" not in "".join(capfd.readouterr())
    assert _state() == state


def test_log_file_names_per_rank():
    assert console.log_file_name(0) == "run.log"
    assert console.log_file_name(3) == "run.rank3.log"


def test_error_filters_still_apply(tmp_path):
    """``-W error`` (or PYTHONWARNINGS) still turns a warning into an exception inside."""
    code = ("import warnings; from megatron_unihetero import console\n"
            "with console.RunLog() as log:\n"
            f"    log.open({str(tmp_path / 'run.log')!r})\n"
            "    warnings.warn('boom', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "UserWarning: boom" in proc.stderr


def test_the_cpu_layer_info_line_goes_to_the_log_file_once(tmp_path):
    """Installing the CPU layer (no CUDA) is said once, in the file, and not on the console."""
    path = str(tmp_path / "run.log")
    code = ("import torch; from megatron_unihetero import platform\n"
            "from megatron_unihetero import console\n"
            "assert not torch.cuda.is_available()\n"
            "with console.RunLog() as log:\n"
            f"    log.open({path!r})\n"
            "    platform.prepare_megatron(); platform.prepare_megatron()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(path) as handle:
        lines = [line for line in handle if "runs on the CPU layer" in line]
    assert len(lines) == 1 and " INFO megatron_unihetero.platform.megatron_cpu: " in lines[0]
    assert "CPU layer" not in proc.stderr + proc.stdout
