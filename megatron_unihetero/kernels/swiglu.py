"""A SwiGLU MLP's first layer and gate: y = silu(x W_gate^T) * (x W_up^T).

    y = swiglu_linear(x, weight)

x [..., H]; weight [2F, H] is megatron-core's fused fc1 weight, the gate's F rows first, then the
up projection's (the order of megatron's ``torch.chunk(fc1(x), 2, dim=-1)``); y is [..., F] in
x's dtype. No bias (Llama has none).

Why not megatron's fc1 followed by its ``glu``: the fused GEMM writes [N, 2F], and everything
after it works on the two strided halves (plus an add of ``glu_linear_offset``, 0 for
SwiGLU). The silu and its backward on a strided half are slower on CPU than on a contiguous
tensor, and the halves' gradients are concatenated back into [N, 2F] (``torch.chunk``'s
backward), one more pass over the activation. Here the two halves are
two GEMMs into contiguous outputs (same FLOPs), the backward writes the weight gradient's two
row blocks in place and sums the input gradient with one ``addmm``: no strided elementwise op
and no concatenation. The GEMMs dominate fc1 + activation, so the gain there is small but it
carries through to megatron's MLP block and a whole CPU training step (figures:
docs/performance_notes.md; ``benchmarks/kernels.py --only swiglu`` reruns the comparison).

impl: "reference" (megatron's composition: one GEMM, chunk, silu * up), "fused" (the two-GEMM
autograd function described above; CPU and CUDA), "auto" (fused;
MEGATRON_UNIHETERO_KERNELS=reference forces the reference). The GPU layer specs use
TransformerEngine's fused MLP instead; this is the local spec's path on one TP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_unihetero.kernels._dispatch import REFERENCE, resolve_impl


def _reference(x, weight):
    gate, up = torch.chunk(F.linear(x, weight), 2, dim=-1)
    return F.silu(gate) * up


class _FusedSwiGLULinear(torch.autograd.Function):
    """Saves x, the gate and up pre-activations and silu(gate) (what autograd through the
    reference's ops would keep), so the backward recomputes nothing."""

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


def _fused(x, weight):
    return _FusedSwiGLULinear.apply(x, weight)


# impl name -> implementation, looked up at call time (tests swap entries to see which ran).
_IMPLS = {REFERENCE: _reference, "fused": _fused}
IMPLS = tuple(_IMPLS)


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) with ``weight`` = [W_gate; W_up]; see the module docstring."""
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [2F, {x.shape[-1]}] (gate rows, then up rows), "
                         f"got {tuple(weight.shape)}")
    impl = resolve_impl("swiglu_linear", impl, IMPLS, ["fused"])
    return _IMPLS[impl](x, weight)
