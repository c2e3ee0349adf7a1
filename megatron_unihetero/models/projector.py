"""The projector: maps vision-encoder features into the LLM's input-embedding space."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """LLaVA's 2-layer MLP: Linear(d_enc, d) -> GELU -> Linear(d, d).

    Replicated across tensor-parallel ranks: at the paper's scale it is ~21M parameters
    (1024x4096 + 4096x4096) against 7B in the LLM, so splitting it would cost more in
    communication than it saves in memory.
    """

    def __init__(self, encoder_dim: int, llm_dim: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(encoder_dim, llm_dim)
        self.linear_fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(nn.functional.gelu(self.linear_fc1(features)))
