"""Run a function on N ranks with torch.distributed, for tests (gloo on CPU, nccl on GPU).

Workers are never forked from the calling process: gloo in forked children of a long pytest
process (threads, initialised communicators) can deadlock. They are started from a
*forkserver*: a separate, clean process that has only imported the heavy modules
(``PRELOAD``: torch, megatron-core, this package's pretraining stack) and forks one child per
rank. So the import, several seconds a worker, is paid once per calling process, not once per
worker; each child still begins from a process that never ran a collective or a thread pool.
The function and its arguments must be picklable (a module-level function). The caller's
environment variables, working directory and (on Linux) stdout/stderr at the time of the call
are applied in each worker (a forkserver child would otherwise have the server's: under pytest,
the output capture of whichever test started it). A failure on any rank is re-raised in the
parent with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once, in the forkserver, before it forks any worker.
# (pretrain imports lazily what the engines and encoders use: the default encoder's HF modeling
# module and deepspeed are named here so that their import, too, is paid once.)
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_unihetero.pretrain",
           "megatron_unihetero.training.launch",
           "transformers.models.dinov2.modeling_dinov2", "deepspeed"]

_preload_set = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _attach_output(caller_pid: int) -> None:
    """Point this process's stdout and stderr where the caller's point now (a pytest capture
    file, a terminal, a pipe), as a spawned child's would."""
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            target = os.open(f"/proc/{caller_pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue  # no /proc, or not reopenable (a socket): keep the server's
        stream.flush()
        os.dup2(target, fd)
        os.close(target)


def _worker(rank, world_size, port, backend, fn, args, kwargs, error_dir, timeout_s, environ,
            caller_pid):
    _attach_output(caller_pid)
    # The caller's environment (the forkserver's is the one it had when it started).
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores for the whole machine: one intra-op thread per rank avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        fn(*args, **kwargs)
        if dist.is_initialized():
            # No rank leaves (closing its gloo pairs) while another still sets up its own: a
            # job without a collective of its own would otherwise race the others' connect.
            dist.barrier()
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ensure_preload() -> None:
    """Name the modules the forkserver imports; only takes effect before it first starts."""
    global _preload_set
    if not _preload_set:
        multiprocessing.set_forkserver_preload(PRELOAD)
        _preload_set = True


def run_distributed_test(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: int = 300,
    **kwargs: Any,
) -> None:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks (forkserver children); raise if any
    rank fails."""
    _ensure_preload()
    with tempfile.TemporaryDirectory() as error_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), backend, fn, args, kwargs, error_dir, timeout_s,
                      dict(os.environ), os.getpid()),
                nprocs=world_size,
                join=True,
                start_method="forkserver",
            )
        except Exception as exc:
            reports = []
            for name in sorted(os.listdir(error_dir)):
                with open(os.path.join(error_dir, name)) as handle:
                    reports.append(f"--- {name} ---\n{handle.read()}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(reports)) from exc


class ProcessResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _fresh(fn, args, environ, out_path, err_path) -> None:
    with open(out_path, "a") as out, open(err_path, "a") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    os.environ.clear()
    os.environ.update(environ)
    # A SystemExit or an exception ends the process as an interpreter would (multiprocessing's
    # bootstrap: the SystemExit's code, or 1 and the traceback on stderr), after the exit
    # handlers: a Manager that fn started (megatron-core's checkpoint writer starts one) is
    # shut down, not left behind.
    fn(*args)


def run_in_fresh_process(fn: Callable[..., Any], *args: Any, env: Optional[Dict[str, str]] = None,
                         timeout_s: int = 120, stderr_to_stdout: bool = False) -> ProcessResult:
    """Run ``fn(*args)`` in one new process that has joined no process group and has exactly
    the environment ``env`` (default: the caller's); return its exit code (a SystemExit's code,
    as an interpreter's; 1 when ``fn`` raised: the traceback is in stderr) and what it printed
    (with ``stderr_to_stdout``, both streams in stdout, in order; stderr is then ""). For tests
    of how a process starts (what it reads from its environment) or ends (its exit code, what
    it prints): a worker of the same preloaded forkserver as run_distributed_test, so the
    import of torch and megatron-core is not paid again. Interpreter-level behaviour (signals
    from outside, atexit handlers, ``python -m`` itself) still needs a subprocess."""
    _ensure_preload()
    ctx = multiprocessing.get_context("forkserver")
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "stdout")
        err_path = out_path if stderr_to_stdout else os.path.join(folder, "stderr")
        open(err_path, "w").close()
        proc = ctx.Process(target=_fresh, args=(fn, args, dict(os.environ if env is None else env),
                                                out_path, err_path))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not end in {timeout_s} s")
        with open(out_path) as out, open(err_path) as err:
            return ProcessResult(proc.exitcode, out.read(), "" if stderr_to_stdout else err.read())
