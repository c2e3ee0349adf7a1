"""Test helpers that ship with the package (multi-rank runs on CPU, markers)."""

from megatron_unihetero.testing.distributed import run_distributed_test, run_in_fresh_process

__all__ = ["run_distributed_test", "run_in_fresh_process"]
