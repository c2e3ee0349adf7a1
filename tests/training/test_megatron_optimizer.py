"""megatron-core's distributed optimizer (ZeRO-1) in the megatron engine, on CPU with gloo."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.training import _optimizer_jobs as jobs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_shards_state_and_matches_the_replicated_one(dtype):
    run_distributed_test(jobs.sharded_matches_replicated_job, 2, dtype)


class _MegatronOptimizer:
    """What use_fused_torch_adam sees of megatron-core's optimizer: the torch one inside."""

    def __init__(self, inner):
        self.optimizer = inner


def test_fused_adam_switch_matches_the_for_loop_and_survives_a_checkpoint_load():
    import torch

    from megatron_unihetero.training.optim import use_fused_torch_adam

    def make():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((5, 3), (3,))]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        return params, torch.optim.AdamW(groups, lr=1e-2)

    def steps(params, opt, indices):
        for i in indices:
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (i + 1)) + p.detach()
            opt.step()

    loop_params, loop = make()
    steps(loop_params, loop, range(4))
    fused_params, fused = make()
    steps(fused_params, fused, range(2))  # started as the for-loop optimizer...
    saved = fused.state_dict()
    use_fused_torch_adam(_MegatronOptimizer(fused))
    fused.load_state_dict(saved)  # ...a checkpoint's groups switch it back...
    assert not fused.param_groups[0]["fused"]
    use_fused_torch_adam(_MegatronOptimizer(fused))  # ...and the engine re-applies the switch
    assert all(group["fused"] for group in fused.param_groups)
    steps(fused_params, fused, range(2, 4))
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
