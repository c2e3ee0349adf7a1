"""Causal attention over packed sequences (block-causal), with grouped-query attention.

Layout: q [b, s, hq, d], k and v [b, s, hkv, d] with hq % hkv == 0; the output is
[b, s, hq, d] in q's dtype. Attention is always causal. ``segment_ids`` [b, s] (int) numbers the
documents packed into each row (0, 1, 2, ... ; -1 marks padding): a position attends only to
earlier-or-same positions *of its own segment*, never across documents. Padding positions
produce zeros (never NaN, in the forward or the backward). ``segment_ids=None`` means one causal
document per row.

A document is a *contiguous run* of equal ids inside a row: the torch path compares ids, so two
separate runs sharing an id would see each other there, but the varlen paths (flash, te) split
runs. Packers emit increasing ids, so both readings agree; do not reuse ids within a row.

Implementations (``impl``):
- "torch": SDPA. With segment_ids it builds a dense [b, 1, s, s] boolean mask (O(s^2) memory:
  the reference and CPU fallback, not for long sequences on GPU); without, ``is_causal=True``.
- "flash": flash_attn varlen kernel on the non-padding tokens, documents delimited by
  cu_seqlens built from segment_ids (CUDA, fp16/bf16 only).
- "te": TransformerEngine DotProductAttention in "thd" format (CUDA).
- "auto": flash, then te, when importable and the tensors are half-precision CUDA tensors;
  otherwise torch. MEGATRON_UNIHETERO_KERNELS=torch forces torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megatron_unihetero.kernels._dispatch import optional_import, require, resolve_impl

IMPLS = ("torch", "flash", "te")


class VarlenLayout(NamedTuple):
    """Packed ("thd") view of a [b, s] batch for varlen kernels.

    cu_seqlens: int32 [num_docs + 1], cumulative document lengths over the kept tokens.
    max_seqlen: the longest document (python int, as flash_attn wants it).
    indices: int64 [total_kept], positions in the flattened [b * s] batch of the kept
        (non-padding) tokens, in order; gather with them, scatter the output back with them.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor


def segment_ids_to_cu_seqlens(segment_ids: torch.Tensor) -> VarlenLayout:
    """Documents of a [b, s] segment-id batch as cu_seqlens over its non-padding tokens.

    A new document starts at the first kept token of every row and wherever the id changes
    inside a row. Padding (id < 0) is dropped. Costs one device-to-host sync (max_seqlen).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [b, s], got {tuple(segment_ids.shape)}")
    b, s = segment_ids.shape
    flat = segment_ids.reshape(-1)
    keep = flat >= 0
    indices = keep.nonzero().squeeze(1)
    kept_ids = flat[indices]
    rows = torch.div(indices, s, rounding_mode="floor")
    starts = torch.ones_like(kept_ids, dtype=torch.bool)
    if kept_ids.numel() > 1:
        starts[1:] = (kept_ids[1:] != kept_ids[:-1]) | (rows[1:] != rows[:-1])
    start_pos = starts.nonzero().squeeze(1)
    total = torch.tensor([kept_ids.numel()], device=flat.device, dtype=start_pos.dtype)
    boundaries = torch.cat([start_pos, total])
    cu_seqlens = boundaries.to(torch.int32)
    max_seqlen = int((boundaries[1:] - boundaries[:-1]).max().item()) if start_pos.numel() else 0
    return VarlenLayout(cu_seqlens, max_seqlen, indices)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend key j: same segment and j <= i.

    Padding queries get their own diagonal only, so no softmax row is empty (an all-masked row
    gives NaN in SDPA's forward or backward); their outputs are zeroed by the caller.
    """
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril_()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid_query = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    mask = (same & causal & valid_query) | (eye & ~valid_query)
    return mask[:, None]


def _attention_torch(q, k, v, segment_ids, softmax_scale):
    hq, hkv = q.shape[2], k.shape[2]
    # SDPA wants [b, h, s, d]; enable_gqa broadcasts kv heads without materialising copies.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = dict(enable_gqa=True) if hq != hkv else {}
    if segment_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale, **gqa)
        return out.transpose(1, 2)
    mask = block_causal_mask(segment_ids)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale, **gqa)
    out = out.transpose(1, 2)
    return out * (segment_ids >= 0)[:, :, None, None].to(out.dtype)


def _attention_flash(q, k, v, segment_ids, softmax_scale):
    flash_attn = optional_import("flash_attn")
    if segment_ids is None:
        # One document per row: the dense kernel avoids the gather/scatter.
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=True)
    b, s, hq, d = q.shape
    layout = segment_ids_to_cu_seqlens(segment_ids)
    idx = layout.indices
    out_packed = flash_attn.flash_attn_varlen_func(
        q.reshape(b * s, hq, d)[idx],
        k.reshape(b * s, k.shape[2], d)[idx],
        v.reshape(b * s, v.shape[2], d)[idx],
        cu_seqlens_q=layout.cu_seqlens,
        cu_seqlens_k=layout.cu_seqlens,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_k=layout.max_seqlen,
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=True,
    )
    out = q.new_zeros(b * s, hq, d)
    out = out.index_copy(0, idx, out_packed)  # out-of-place: keeps autograd simple
    return out.view(b, s, hq, d)


_TE_MODULES: dict = {}


def _attention_te(q, k, v, segment_ids, softmax_scale):
    te = optional_import("transformer_engine.pytorch")
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    fmt = "bshd" if segment_ids is None else "thd"
    key = (hq, hkv, d, scale, fmt, q.device)
    if key not in _TE_MODULES:  # the module holds no parameters: cache one per configuration
        _TE_MODULES[key] = te.DotProductAttention(
            num_attention_heads=hq,
            kv_channels=d,
            num_gqa_groups=hkv,
            attention_dropout=0.0,
            qkv_format=fmt,
            attn_mask_type="causal" if segment_ids is None else "padding_causal",
            softmax_scale=scale,
        )
    module = _TE_MODULES[key]
    if segment_ids is None:
        return module(q, k, v).view(b, s, hq, d)
    layout = segment_ids_to_cu_seqlens(segment_ids)
    idx = layout.indices
    out_packed = module(
        q.reshape(b * s, hq, d)[idx],
        k.reshape(b * s, hkv, d)[idx],
        v.reshape(b * s, hkv, d)[idx],
        cu_seqlens_q=layout.cu_seqlens,
        cu_seqlens_kv=layout.cu_seqlens,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_kv=layout.max_seqlen,
    ).view(-1, hq, d)
    out = q.new_zeros(b * s, hq, d).index_copy(0, idx, out_packed)
    return out.view(b, s, hq, d)


def _half_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_ids: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Block-causal grouped-query attention; see the module docstring for layouts."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [b,s,hq,d], k/v [b,s,hkv,d]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"hq={q.shape[2]} is not a multiple of hkv={k.shape[2]}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [b, s]={tuple(q.shape[:2])}, got {tuple(segment_ids.shape)}")

    has_flash = optional_import("flash_attn") is not None
    has_te = optional_import("transformer_engine.pytorch") is not None
    order = []
    if _half_cuda(q) and has_flash:
        order.append("flash")
    if _half_cuda(q) and has_te:
        order.append("te")
    order.append("torch")
    impl = resolve_impl("attention", impl, IMPLS, order)

    if impl == "flash":
        require(has_flash, "attention", impl, "flash_attn is not installed")
        require(_half_cuda(q), "attention", impl, "flash_attn needs fp16/bf16 CUDA tensors")
        return _attention_flash(q, k, v, segment_ids, softmax_scale)
    if impl == "te":
        require(has_te, "attention", impl, "transformer_engine is not installed")
        require(q.is_cuda, "attention", impl, "TransformerEngine needs CUDA tensors")
        return _attention_te(q, k, v, segment_ids, softmax_scale)
    return _attention_torch(q, k, v, segment_ids, softmax_scale)
