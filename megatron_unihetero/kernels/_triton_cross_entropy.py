"""Triton kernels for the chunked linear cross-entropy (imported lazily by cross_entropy.py).

Two row-wise kernels over a [c, V_local] logits chunk, working in the logits' own dtype
(bf16 logits are read as bf16 and upcast in registers, so no fp32 copy of the chunk exists):
- row_stats: online-softmax pass giving the row max and sum(exp(x - max)) (one read);
- logits_grad_: overwrites the logits with (softmax - one_hot) * row_weight (one read, one write).
The cross-rank combination of the statistics happens in torch between the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _row_stats_kernel(logits_ptr, stride, max_ptr, sumexp_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = float("-inf")
    s = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # Rescale the running sum to the new max (online softmax, Milakov & Gimelshein 2018).
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)


@triton.jit
def _logits_grad_kernel(logits_ptr, stride, lse_ptr, target_ptr, row_weight_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row)  # local column of the label, -1 if not in this shard
    w = tl.load(row_weight_ptr + row)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse)
        g = tl.where(cols == target, g - 1.0, g) * w
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _block(v: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(v))


def row_stats(logits: torch.Tensor):
    """(row max, sum exp(x - max)) of a [c, V] chunk, both fp32 [c]."""
    assert logits.stride(1) == 1
    c, v = logits.shape
    row_max = torch.empty(c, dtype=torch.float32, device=logits.device)
    sumexp = torch.empty_like(row_max)
    _row_stats_kernel[(c,)](logits, logits.stride(0), row_max, sumexp, v, BLOCK=_block(v))
    return row_max, sumexp


def logits_grad_(logits, lse, target_local, row_weight):
    """In place: logits <- (softmax(logits) - one_hot(target)) * row_weight; returns logits."""
    assert logits.stride(1) == 1
    c, v = logits.shape
    _logits_grad_kernel[(c,)](
        logits, logits.stride(0), lse.contiguous(), target_local.contiguous(),
        row_weight.contiguous(), v, BLOCK=_block(v),
    )
    return logits
