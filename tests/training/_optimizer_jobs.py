"""Jobs for the megatron-optimizer tests (module-level so spawned workers can import them)."""

import torch
import torch.distributed as dist

from tests.models import _parity_jobs as parity


def _engine(model, distributed: bool, dtype: torch.dtype):
    from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    cfg = RunConfig(model=parity.tiny_config(),
                    parallel=ParallelConfig(distributed_optimizer=distributed),
                    train=TrainConfig(lr=1e-3, warmup_steps=0, clip_grad=1.0, dtype="fp32"))
    return MegatronEngine(model, cfg)


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])


def sharded_matches_replicated_job(dtype_name: str):
    """DP=2: the distributed optimizer shards its state and takes the replicated optimizer's steps."""
    from megatron.core import parallel_state

    from megatron_unihetero import parallel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    parallel.initialize(1, 1, seed=7)
    cfg = parity.tiny_config()
    sharded_model = parallel.build_model(cfg, params_dtype=dtype)
    replicated_model = parallel.build_model(cfg, params_dtype=dtype)
    replicated_model.load_state_dict(sharded_model.state_dict())
    sharded = _engine(sharded_model, True, dtype)
    replicated = _engine(replicated_model, False, dtype)

    weights = {"text": 1.0, "semantic": 1.0}
    rank = parallel_state.get_data_parallel_rank()
    for step in range(3):
        batches = parity.make_batches(seed=100 * step + rank)  # each DP rank its own data
        a = sharded.train_step(batches, weights).figures()  # warmup 0: the scheduler starts at train.lr
        b = replicated.train_step(batches, weights).figures()
        for key in ("text", "semantic", "grad_norm"):
            # Same maths, another reduction order (reduce-scatter vs all-reduce).
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (step, key, a[key], b[key])
    # bf16: both step fp32 masters and round them once into the model, identically.
    diff = (_flat_params(sharded_model) - _flat_params(replicated_model)).abs().max()
    print(f"max parameter difference after 3 steps ({dtype_name}): {float(diff):.3g}")
    assert float(diff) <= (1e-5 if dtype == torch.float32 else 2e-3), float(diff)

    # The replicas agree after the all-gather of the updated shards.
    mine = _flat_params(sharded_model)
    gathered = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(gathered, mine)
    assert torch.equal(gathered[0], gathered[1])

    # Each DP rank holds half of the fp32 masters and Adam moments (up to bucket padding).
    def state_numel(engine):
        inner = [opt.optimizer for opt in engine.optimizer.chained_optimizers]
        return sum(state["exp_avg"].numel() for opt in inner for state in opt.state.values())

    total = sum(p.numel() for p in sharded_model.parameters() if p.requires_grad)
    assert state_numel(replicated) == total
    assert abs(state_numel(sharded) - total / 2) <= 64 * len(list(sharded_model.parameters())), \
        (state_numel(sharded), total)
    masters = [p for opt in sharded.optimizer.chained_optimizers
               for group in opt.optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in masters)
    parallel.destroy()
