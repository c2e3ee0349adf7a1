"""Jobs for the checkpoint-integrity tests (module-level so spawned workers can import them)."""

import torch.distributed as dist

from megatron_unihetero.training import checkpoint as ckpt


def agree_job(ckpt_dir: str, fallback: bool, expected) -> None:
    """Every rank must get rank 0's choice, or rank 0's error as a CheckpointError."""
    try:
        chosen = ckpt.agree_on_resume(ckpt_dir, "full", fallback)
    except ckpt.CheckpointError as exc:
        chosen = f"error: {exc}"
    if expected == "error":
        assert chosen.startswith("error:"), (dist.get_rank(), chosen)
        if dist.get_rank() == 0:
            assert "__0_0.distcp" in chosen, chosen
    else:
        assert chosen == expected, (dist.get_rank(), chosen)
