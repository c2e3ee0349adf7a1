"""Checkpoints on disk: megatron-core torch_dist I/O (dist.py) and the one error class
(errors.py). Naming, manifests, saving and resuming: training/checkpoint.py (CheckpointManager)."""
