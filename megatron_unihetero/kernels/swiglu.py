"""A SwiGLU MLP's first layer and gate: y = silu(x W_gate^T) * (x W_up^T).

    y = swiglu_linear(x, weight)

x [..., H]; weight [2F, H] is megatron-core's fused fc1 weight, the gate's F rows first, then the
up projection's (the order of megatron's ``torch.chunk(fc1(x), 2, dim=-1)``); y is [..., F] in
x's dtype. No bias (Llama has none).

Why not megatron's fc1 followed by its ``glu``: the fused GEMM writes [N, 2F], and everything
after it works on the two strided halves (plus an add of ``glu_linear_offset``, 0 for
SwiGLU). The silu and its backward on a half each cost 1.4x their contiguous time on CPU, and
the halves' gradients are concatenated back into [N, 2F] (``torch.chunk``'s backward): 1.07 ms
fwd+bwd of the activation alone at the tiny config's [1024, 2 x 344], against 0.66 ms for
separate contiguous halves. Here the two halves are two GEMMs into contiguous outputs (same
FLOPs), the backward writes the weight gradient's two row blocks in place and sums the input
gradient with one ``addmm``: no strided elementwise op and no concatenation. CPU, tiny config,
paired and shuffled runs: fc1 + activation alone 4.3 vs 4.5-4.7 ms fwd+bwd when warm (the
GEMMs dominate; ``benchmarks/kernels.py --only swiglu``, one lukewarm run per process, gave
1.06x and 0.66x the unfused CPU time in two runs); megatron's MLP block 6.5 vs 6.8 ms; a whole
training step 3.2 ms (4%) shorter.

impl: "torch" (the autograd function above; CPU and CUDA), "unfused" (megatron's composition:
one GEMM, chunk, silu * up; the reference), "auto" (torch; MEGATRON_UNIHETERO_KERNELS=torch
forces the reference). The GPU layer specs use TransformerEngine's fused MLP instead; this is
the local spec's path on one TP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_unihetero.kernels._dispatch import resolve_impl

IMPLS = ("torch", "unfused")


class _SwiGLULinearFunction(torch.autograd.Function):
    """Saves x, the gate and up pre-activations and silu(gate) (what autograd through the
    unfused ops would keep), so the backward recomputes nothing."""

    @staticmethod
    def forward(ctx, x, weight):
        width = weight.shape[0] // 2
        rows = x.reshape(-1, x.shape[-1])
        gate = torch.mm(rows, weight[:width].t())
        up = torch.mm(rows, weight[width:].t())
        activated = F.silu(gate)
        ctx.save_for_backward(rows, weight, gate, up, activated)
        ctx.input_shape = x.shape
        return (activated * up).view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, gate, up, activated = ctx.saved_tensors
        width = weight.shape[0] // 2
        grad = grad.reshape(-1, width)
        grad_up = grad * activated
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_weight = torch.empty_like(weight)
        torch.mm(grad_gate.t(), rows, out=grad_weight[:width])
        torch.mm(grad_up.t(), rows, out=grad_weight[width:])
        grad_x = torch.mm(grad_gate, weight[:width]).addmm_(grad_up, weight[width:])
        return grad_x.view(ctx.input_shape), grad_weight


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) with ``weight`` = [W_gate; W_up]; see the module docstring."""
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [2F, {x.shape[-1]}] (gate rows, then up rows), "
                         f"got {tuple(weight.shape)}")
    if resolve_impl("swiglu_linear", impl, IMPLS, ["torch", "unfused"]) == "unfused":
        gate, up = torch.chunk(F.linear(x, weight), 2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLULinearFunction.apply(x, weight)
