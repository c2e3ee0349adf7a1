"""RMSNorm for megatron-core layer specs, computed by :func:`megatron_unihetero.kernels.rms_norm`.

Takes the place of megatron-core's ``WrappedTorchNorm`` (torch.nn.RMSNorm) in the local layer
spec and as the block's final norm: same constructor, same ``weight`` parameter (initialised to
ones) and state-dict key, so checkpoints and the HF converters are unaffected. The kernel is
apex's fused RMSNorm or our Triton one on GPU, and on CPU one autograd node instead of
autograd through five elementwise ops (a small gain for the norm alone; a whole CPU training
step does not change).
"""

from __future__ import annotations

import torch

from megatron_unihetero.kernels.rmsnorm import rms_norm


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm module built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm does not support zero-centred gamma")
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Under sequence parallelism each TP rank normalises its slice of the sequence, so the
        # weight's gradient is a partial sum: megatron-core's mark (as on its own norms), by
        # which its grad finalisation all-reduces it over TP (training/engine_megatron.py).
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
