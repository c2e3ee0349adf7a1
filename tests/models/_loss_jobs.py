"""Jobs for the loss-normalisation tests (module-level so spawned workers can import them)."""

import torch
import torch.distributed as dist

from tests.models._parity_jobs import make_batches, tiny_config
from megatron_unihetero.testing.sharding import rank_layout


def dp_split_job(ref_path, num_micro_per_rank):
    """DP ranks, each with its micro-batches, against one rank with all of them.

    The engine's DDP settings (sum over DP, the model's calculate_per_token_loss) and the loss
    normalised by global counts give the reference's loss and gradients.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_unihetero import parallel
    from megatron_unihetero.testing.sharding import shard_state_dict
    from megatron_unihetero.training.step import forward_backward

    ref = torch.load(ref_path, weights_only=True)
    cfg = tiny_config()
    parallel.initialize(1, 1, seed=3)
    model = parallel.build_model(cfg)
    model.load_state_dict(shard_state_dict(ref["state"], model.state_dict().keys(),
                                           rank_layout(model)), strict=False)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=False),
        model)
    ddp.zero_grad_buffer()
    batches = make_batches()  # the reference's two micro-batches
    if num_micro_per_rank == 2:  # each row a micro-batch (row i holds image i)
        batches = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(2)]
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = len(batches) // world
    mine = batches[rank * per_rank:(rank + 1) * per_rank]
    assert len(mine) == num_micro_per_rank
    summary = forward_backward(ddp, mine, weights={"text": 1.0, "semantic": 1.0},
                               image_token_id=cfg.image_token_id,
                               dp_group=parallel_state.get_data_parallel_group()).figures()
    ddp.finish_grad_sync()
    loss = torch.tensor([summary["loss"]], dtype=torch.float64)
    dist.all_reduce(loss)  # each DP rank holds its share of the step mean
    if rank == 0:
        assert abs(float(loss) - ref["summary"]["loss"]) <= 1e-5 * abs(ref["summary"]["loss"])
        checked = 0
        for name, param in model.named_parameters():
            if param.requires_grad and name in ref["grads"]:
                expected = ref["grads"][name]
                err = (param.main_grad - expected).norm()
                assert err <= 1e-5 * expected.norm() + 1e-8, (name, float(err))
                checked += 1
        assert checked > 0
    dist.barrier()
    parallel.destroy()
