"""Split a full (TP=1, PP=1) state dict into one rank's shard.

The rules are by parameter name, for our Llama layout on megatron-core layers:

* vocab-parallel embedding and LM head, ``linear_qkv``: split along dim 0;
* ``linear_proj`` and ``linear_fc2`` (row-parallel): split along dim 1;
* ``linear_fc1`` of SwiGLU: megatron keeps [gate_r; up_r] on rank r, so the full [gate; up]
  is split as two halves, each along dim 0;
* everything else (norms, vision encoder, projector, heads) is replicated;
* pipeline stages hold consecutive layers: local ``layers.{i}`` is global ``layers.{offset+i}``.

These pure functions place one full set of weights (a reference, an HF conversion) into a model
at any TP/PP without a process group: the parallel-parity tests use them (test-only: checkpoints
do not, torch_dist reshards them through each module's sharded state dict,
checkpointing/dist.py). :func:`rank_layout` reads a built model's place in the grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch
from megatron.core import parallel_state

from megatron_unihetero.models.stage_plan import TARGET_PROJECTOR_PREFIX

_LAYER = re.compile(r"^(llm\.decoder\.layers\.)(\d+)(\..*)$")
_DIM0 = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
_DIM1 = ("linear_proj.weight", "linear_fc2.weight")
_GLU = ("linear_fc1.weight",)
# The last stage's copy of the projector (models/stage_plan.py): filled from the projector's
# tensors when a full state dict has none of its own.
MIRROR_PREFIX = TARGET_PROJECTOR_PREFIX


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits: its TP rank/size and the global index of its first layer."""

    tp_rank: int = 0
    tp_size: int = 1
    layer_offset: int = 0


def rank_layout(model) -> RankLayout:
    """This rank's place in the TP x PP grid, for (un)sharding full state dicts."""
    layers = model.llm.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    return RankLayout(parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_world_size(), offset)


def split_rule(name: str) -> Tuple[str, int]:
    """('dim', d) for a TP-split tensor, ('glu', 0) for SwiGLU fc1, ('replicated', -1).

    Only the LLM (``llm.*``) is tensor-parallel; the projector and heads reuse layer names
    like ``linear_fc1`` but are replicated.
    """
    if not name.startswith("llm."):
        return "replicated", -1
    if name.endswith(_GLU):
        return "glu", 0
    if name.endswith(_DIM0):
        return "dim", 0
    if name.endswith(_DIM1):
        return "dim", 1
    return "replicated", -1


def to_global_name(name: str, layer_offset: int) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    return f"{match.group(1)}{int(match.group(2)) + layer_offset}{match.group(3)}"


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    kind, dim = split_rule(name)
    if kind == "replicated" or tp_size == 1:
        return full
    if kind == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: size {full.shape[dim]} along dim {dim} is not divisible by "
                         f"tensor parallel size {tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def is_model_state(name: str) -> bool:
    return not name.endswith("_extra_state")


def shard_state_dict(full: Dict[str, torch.Tensor], local_names: Iterable[str],
                     layout: RankLayout) -> Dict[str, torch.Tensor]:
    """The tensors one rank holds, for the names of its local model (``model.state_dict()``)."""
    out = {}
    for name in local_names:
        if not is_model_state(name):
            continue
        global_name = to_global_name(name, layout.layer_offset)
        if global_name not in full and global_name.startswith(MIRROR_PREFIX):
            global_name = "projector." + global_name[len(MIRROR_PREFIX):]
        if global_name not in full:
            raise KeyError(f"the full state dict has no tensor {global_name!r} "
                           f"(needed for local parameter {name!r})")
        out[name] = shard_tensor(global_name, full[global_name], layout.tp_rank, layout.tp_size)
    return out
