"""Checkpoints on disk (dist.py: megatron-core torch_dist) and the TP slicing of full state dicts (sharding.py)."""
