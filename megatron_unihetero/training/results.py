"""What a step returns, and how every figure is reduced over ranks: declared once, here.

:class:`StepResult` is what an engine's ``train_batch`` / ``eval_batch`` returns on every rank
(the objective losses and diagnostics live on the last pipeline stage; other stages hold empty
ones). Each field's reduction is declared in :data:`REDUCTIONS`; :func:`reduce_figures` is the
one function that applies such declarations with one collective per kind, and the trainer's own
figures (tokens, documents, FLOPs: :data:`WORK`) go through it too. :meth:`StepResult.figures`
turns a reduced result into the flat record that metrics.jsonl, TensorBoard and W&B receive
(training/metrics.py writes all three from that record).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_unihetero import platform
from megatron_unihetero.eval import diagnostics

# How a figure combines over the ranks of a group.
SUM = "sum"  # each rank holds a share (a loss share of a global mean, a count of its own work)
MAX = "max"  # the worst rank matters (a step time)
GLOBAL = "global"  # already the same on every rank (global counts, the gradient norm, a skip)

# StepResult's fields and their reduction over data-parallel ranks.
REDUCTIONS: Dict[str, str] = {
    "losses": SUM,  # each DP rank holds its share: sum / the step's global count
    "stats": SUM,  # sufficient statistics: sums of rows
    "counts": GLOBAL,  # counted over every DP rank before the step ran (training/losses.py)
    "grad_norm": GLOBAL,  # megatron-core's and DeepSpeed's norms are global
    "skipped": GLOBAL,  # one all-reduced flag decided it on every rank
    "lr": GLOBAL,
    "module_lrs": GLOBAL,  # the param groups' rates: the same on every rank (all hold every group)
    "times": MAX,  # the slowest DP rank's time of each phase of the step
}

# The trainer's work figures per step, over data-parallel ranks.
WORK: Dict[str, str] = {"tokens": SUM, "documents": SUM, "flops": SUM}


@dataclasses.dataclass
class StepResult:
    """One step (or evaluation batch) on this rank.

    ``losses``: each objective's share of the step mean (summed over DP it is the mean) and
    ``loss``, their weighted total; ``counts``: each objective's global target tokens;
    ``stats``: the diagnostics' sufficient statistics by name (eval/diagnostics.py: ``semantic``,
    ``pixel``, ``embedding``; float64 sums); ``grad_norm`` / ``skipped``: the optimizer step's
    (None / False for evaluation); ``lr``: the schedule's base learning rate the step ran at
    (train.lr's curve: a module with ``lr_mult`` 1 trains at it); ``module_lrs``: each training
    module's own (``train.module_lr``: ``lr_mult`` x ``lr``), logged as ``lr/MODULE``; ``times``: the
    wall time of the step's phases in seconds (training/monitor.py: ``data``,
    ``forward_backward``, ``optimizer``, ``checkpoint``).
    """

    losses: Dict[str, float] = dataclasses.field(default_factory=dict)
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    grad_norm: Optional[float] = None
    skipped: bool = False
    lr: Optional[float] = None
    module_lrs: Dict[str, float] = dataclasses.field(default_factory=dict)
    times: Dict[str, float] = dataclasses.field(default_factory=dict)

    def figures(self, prefix: str = "") -> Dict[str, float]:
        """The flat record to log: the losses, the diagnostics' figures (R², baselines, ...;
        computed from the statistics, so call it after the DP reduction), the gradient norm,
        whether the step was skipped, the learning rates (the base, and ``lr/MODULE``)."""
        out: Dict[str, float] = {prefix + k: v for k, v in self.losses.items()}
        for name, stats in self.stats.items():
            out.update(diagnostics.figures(name, stats, prefix))
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
            out["skipped"] = 1.0 if self.skipped else 0.0
        if self.lr is not None:
            out["lr"] = self.lr
        out.update({f"lr/{module}": lr for module, lr in self.module_lrs.items()})
        out.update({f"time_{name}_s": seconds for name, seconds in self.times.items()})
        return out

    def add(self, other: "StepResult") -> "StepResult":
        """The sum of two results' losses and statistics (evaluation over several batches)."""
        losses = dict(self.losses)
        for key, value in other.losses.items():
            losses[key] = losses.get(key, 0.0) + value
        stats = dict(self.stats)
        for key, value in other.stats.items():
            stats[key] = diagnostics.add_stats(stats.get(key), value)
        return StepResult(losses=losses, counts=dict(other.counts), stats=stats)

    def scaled(self, factor: float) -> "StepResult":
        """The losses times ``factor`` (a mean over evaluation batches); statistics stay sums."""
        return dataclasses.replace(self, losses={k: v * factor for k, v in self.losses.items()})


def reduce_figures(values: Mapping[str, object], reductions: Mapping[str, str], group=None) -> Dict[str, object]:
    """``values`` (floats or 1-D tensors) reduced over ``group`` as ``reductions`` declares:
    one all-reduce for every SUM entry together, one for every MAX entry; GLOBAL entries and a
    group of one rank are left as they are. Tensors come back as float64 CPU tensors, floats as
    floats."""
    out = dict(values)
    if group is None or dist.get_world_size(group) == 1:
        return out
    for kind, op in ((SUM, dist.ReduceOp.SUM), (MAX, dist.ReduceOp.MAX)):
        keys = sorted(k for k in values if reductions[k] == kind)
        if not keys:
            continue
        parts = [torch.as_tensor(values[k], dtype=torch.float64).reshape(-1) for k in keys]
        packed = torch.cat(parts).to(platform.device())
        dist.all_reduce(packed, op=op, group=group)
        for key, part in zip(keys, packed.cpu().split([p.numel() for p in parts])):
            out[key] = part if torch.is_tensor(values[key]) else float(part)
    return out


def reduce_over_dp(result: StepResult, group) -> StepResult:
    """``result`` summed over the data-parallel ``group`` (:data:`REDUCTIONS`): then its losses
    are the step means and its statistics the step's sums. Every DP rank of a stage must call
    it (the last stage: the same loss and statistics keys on every DP rank)."""
    # The fields REDUCTIONS does not declare GLOBAL (dicts: each entry reduced the same way),
    # flattened so that each kind of reduction is one collective.
    fields = [name for name, kind in REDUCTIONS.items() if kind != GLOBAL]
    flat: Dict[str, object] = {}
    reductions: Dict[str, str] = {}
    for field in fields:
        for key, value in getattr(result, field).items():
            flat[f"{field}/{key}"] = value
            reductions[f"{field}/{key}"] = REDUCTIONS[field]
    reduced = reduce_figures(flat, reductions, group)
    return dataclasses.replace(result, **{
        field: {k: reduced[f"{field}/{k}"] for k in getattr(result, field)} for field in fields})
