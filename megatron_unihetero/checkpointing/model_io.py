"""Model weights on disk: one safetensors file per (TP rank, PP stage), plus a layout file.

    ITER_DIR/model/layout.json           {"tp_size", "pp_size", "shards": {file: RankLayout}}
    ITER_DIR/model/tp00_pp00.safetensors  that rank's ``model.state_dict()`` (local names)

Data-parallel replicas hold the same weights, so only DP rank 0 writes. Loading works at any
TP/PP size: when the saved layout equals the running one each rank reads its own file;
otherwise the full state dict is merged from all files and re-split (sharding.py). No pickle
is involved (safetensors + JSON), so loading an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Dict, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from megatron_unihetero.checkpointing.sharding import (
    RankLayout,
    is_model_state,
    merge_state_dicts,
    shard_state_dict,
)

LAYOUT_FILE = "layout.json"


class CheckpointError(RuntimeError):
    pass


def shard_file_name(tp_rank: int, pp_rank: int, vp_stage: Optional[int] = None) -> str:
    """One file per (TP rank, PP rank[, virtual stage])."""
    vp = f"_vp{vp_stage:02d}" if vp_stage is not None else ""
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}{vp}.safetensors"


def save_model_shard(state: Dict[str, torch.Tensor], model_dir: str, layout: RankLayout,
                     pp_rank: int, vp_stage: Optional[int] = None) -> str:
    """Write one rank's (or one virtual-stage chunk's) model state; DP rank 0 of each TP x PP
    coordinate calls it."""
    os.makedirs(model_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()
               if is_model_state(k) and torch.is_tensor(v)}
    path = os.path.join(model_dir, shard_file_name(layout.tp_rank, pp_rank, vp_stage))
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def write_layout(model_dir: str, tp_size: int, pp_size: int,
                 layer_offsets: Dict[Union[int, Tuple[int, int]], int],
                 drop_prefixes: Tuple[str, ...], vpp_size: Optional[int] = None) -> None:
    """Describe the shard grid (call once, e.g. on global rank 0).

    ``layer_offsets`` maps a pipeline rank (or ``(pp_rank, vp_stage)`` with virtual stages) to
    the global index of its first layer.
    """
    shards = {}
    stages = [(p, v) for p in range(pp_size) for v in range(vpp_size)] if vpp_size else \
        [(p, None) for p in range(pp_size)]
    for pp_rank, vp_stage in stages:
        offset = layer_offsets[(pp_rank, vp_stage) if vp_stage is not None else pp_rank]
        for tp_rank in range(tp_size):
            shards[shard_file_name(tp_rank, pp_rank, vp_stage)] = dict(
                asdict(RankLayout(tp_rank, tp_size, offset)), pp_rank=pp_rank, vp_stage=vp_stage)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, LAYOUT_FILE), "w") as handle:
        json.dump({"tp_size": tp_size, "pp_size": pp_size, "vpp_size": vpp_size, "shards": shards,
                   "drop_prefixes": list(drop_prefixes)}, handle, indent=1)


def read_layout(model_dir: str) -> dict:
    path = os.path.join(model_dir, LAYOUT_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {model_dir!r} is not a megatron_unihetero "
                              f"model checkpoint folder")
    with open(path) as handle:
        return json.load(handle)


def load_full_state(model_dir: str) -> Dict[str, torch.Tensor]:
    """Merge every shard of a checkpoint into one TP=1 / PP=1 state dict (on CPU)."""
    info = read_layout(model_dir)
    ranks = []
    for name, meta in info["shards"].items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (layout.json lists it)")
        layout = RankLayout(meta["tp_rank"], meta["tp_size"], meta["layer_offset"])
        ranks.append((layout, load_file(path)))
    return merge_state_dicts(ranks, drop_prefixes=tuple(info.get("drop_prefixes", ())))


def load_into_model(model, model_dir: str, layout: RankLayout, pp_rank: int, pp_size: int,
                    vp_stage: Optional[int] = None, vpp_size: Optional[int] = None) -> None:
    """Load a checkpoint saved at any TP/PP(/VPP) into this rank's stage (or chunk); strict."""
    info = read_layout(model_dir)
    own = os.path.join(model_dir, shard_file_name(layout.tp_rank, pp_rank, vp_stage))
    same_grid = (info["tp_size"] == layout.tp_size and info["pp_size"] == pp_size
                 and info.get("vpp_size") == vpp_size)
    if same_grid and os.path.isfile(own):
        local = load_file(own)
    else:
        full = load_full_state(model_dir)
        local = shard_state_dict(full, model.state_dict().keys(), layout)
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if is_model_state(k)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {model_dir!r} does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
