"""attention(): block-causal masking over packed documents and GQA, against a per-document
loop reference, forward and backward, fp32 and bf16."""

import math

import pytest
import torch

from megatron_unihetero.kernels import attention, segment_ids_to_cu_seqlens
from megatron_unihetero.kernels.attention import block_causal_mask
from megatron_unihetero.kernels.testing import assert_close

# Row 0: three documents then padding; row 1: one document; row 2: padding in the middle of
# nothing (starts with a short doc, then a long one, no padding).
SEGMENTS = torch.tensor([
    [0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
])


def _document_runs(row):
    """(start, end) of each contiguous run of one non-negative id."""
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            if row[start] >= 0:
                runs.append((start, i))
            start = i
    return runs


def loop_reference(q, k, v, segment_ids, scale=None):
    """Plain softmax attention, one document at a time, in fp32; zeros on padding."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    q, k, v = q.float(), k.float().repeat_interleave(group, 2), v.float().repeat_interleave(group, 2)
    rows = []
    for bi in range(b):
        out = torch.zeros(s, hq, d)
        segs = segment_ids[bi].tolist() if segment_ids is not None else [0] * s
        for a, e in _document_runs(segs):
            qq, kk, vv = (t[bi, a:e].transpose(0, 1) for t in (q, k, v))  # [h, n, d]
            scores = qq @ kk.transpose(1, 2) * scale
            causal = torch.ones(e - a, e - a, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = out.index_put((torch.arange(a, e),), (probs @ vv).transpose(0, 1))
        rows.append(out)
    return torch.stack(rows)


def _qkv(b, s, hq, hkv, d, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=gen).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv)]


def check_parity(impl, dtype, hq=4, hkv=2, d=16, segment_ids=SEGMENTS, scale=None, device="cpu",
                 backward=True):
    b, s = (segment_ids.shape if segment_ids is not None else (2, 12))
    q, k, v = _qkv(b, s, hq, hkv, d, dtype, device)
    seg = segment_ids.to(device) if segment_ids is not None else None
    if not backward:
        q, k, v = (t.detach() for t in (q, k, v))
        out = attention(q, k, v, segment_ids=seg, softmax_scale=scale, impl=impl)
        ref = loop_reference(q.cpu(), k.cpu(), v.cpu(), segment_ids, scale)
        assert torch.isfinite(out).all()
        assert_close(out, ref, dtype, msg=f"{impl} out")
        return
    out = attention(q, k, v, segment_ids=seg, softmax_scale=scale, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if seg is not None:
        grad = grad * (seg >= 0)[:, :, None, None]  # padding outputs are unspecified zeros
    out.backward(grad)
    qr, kr, vr = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    ref = loop_reference(qr, kr, vr, segment_ids, scale)
    ref.backward(grad.float().cpu())
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert_close(out, ref, dtype, msg=f"{impl} out")
    for name, t, r in (("q", q, qr), ("k", k, kr), ("v", v, vr)):
        assert_close(t.grad, r.grad, dtype, msg=f"{impl} grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_block_causal_matches_loop(dtype, hq, hkv):
    check_parity("reference", dtype, hq=hq, hkv=hkv)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_flex_block_causal_matches_loop(hq, hkv):
    """FlexAttention's document mask, run eagerly on CPU, forward only (torch has no CPU
    backward for it); the compiled forward and backward are the GPU test's."""
    check_parity("flex", torch.float32, hq=hq, hkv=hkv, backward=False)
    check_parity("flex", torch.float32, hq=hq, hkv=hkv, segment_ids=None, scale=0.3, backward=False)
    q, k, v = _qkv(1, 4, hq, hkv, 8, torch.float32)
    with pytest.raises(RuntimeError, match="no CPU backward"):
        attention(q, k, v, impl="flex")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_plain_causal_and_scale(dtype):
    check_parity("reference", dtype, segment_ids=None)
    check_parity("reference", dtype, scale=0.3)


def test_left_padding_beside_a_whole_row():
    """One document per row, b documents of length s, yet row 0 is left-padded (generation's
    batch of prompts): not the plain causal case, the padding must stay unseen."""
    check_parity("reference", torch.float32, segment_ids=torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0],
                                                                        [0, 0, 0, 0, 0, 0, 0, 0]]))


def test_no_segments_equals_single_segment():
    q, k, v = _qkv(2, 9, 4, 2, 8, torch.float32)
    a = attention(q, k, v, impl="reference")
    b = attention(q, k, v, segment_ids=torch.zeros(2, 9, dtype=torch.long), impl="reference")
    torch.testing.assert_close(a, b)


def test_documents_do_not_interact():
    """Changing a document's keys/values must not change any other document's output."""
    q, k, v = (t.detach() for t in _qkv(3, 12, 4, 2, 8, torch.float32))
    out = attention(q, k, v, segment_ids=SEGMENTS, impl="reference")
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:5] += 5.0  # document 1 of row 0
    v2[0, 3:5] -= 3.0
    out2 = attention(q, k2, v2, segment_ids=SEGMENTS, impl="reference")
    changed = (out2 - out).abs().amax(dim=(2, 3)) > 1e-6
    assert changed[0, 3:5].all() and changed.sum() == 2
    assert out[0, 9:].abs().max() == 0  # padding rows are zeros


def test_mask_shape_and_padding_diagonal():
    mask = block_causal_mask(SEGMENTS)
    assert mask.shape == (3, 1, 12, 12)
    assert mask[0, 0, 4].tolist() == [False] * 3 + [True, True] + [False] * 7
    assert mask[0, 0, 10].nonzero().flatten().tolist() == [10]  # padding sees only itself


def test_segment_ids_to_cu_seqlens():
    layout = segment_ids_to_cu_seqlens(SEGMENTS)
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 9, 21, 22, 33]
    assert layout.max_seqlen == 12
    assert layout.indices.tolist() == list(range(9)) + list(range(12, 36))
    # A repeated id in the next row still starts a new document.
    two = segment_ids_to_cu_seqlens(torch.zeros(2, 4, dtype=torch.long))
    assert two.cu_seqlens.tolist() == [0, 4, 8] and two.max_seqlen == 4


def test_explicit_gpu_impls_fail_clearly_on_cpu():
    q, k, v = _qkv(1, 4, 2, 2, 8, torch.float32)
    for impl in ("flash", "te"):
        with pytest.raises(RuntimeError, match="not usable"):
            attention(q, k, v, impl=impl)
    with pytest.raises(ValueError):
        attention(q, k, v, impl="bogus")
    with pytest.raises(ValueError):
        attention(q, k[:, :, :1].expand(1, 4, 1, 8).repeat(1, 1, 3, 1), v, impl="reference")


@pytest.mark.requires_gpu
@pytest.mark.parametrize("impl", ["reference", "flash", "te", "flex", "auto"])
def test_gpu_impls_match_loop(impl):
    from megatron_unihetero.kernels._dispatch import optional_import

    module = {"flash": "flash_attn", "te": "transformer_engine.pytorch"}.get(impl)
    if module and optional_import(module) is None:
        pytest.skip(f"{module} not installed")
    check_parity(impl, torch.bfloat16, hq=8, hkv=2, d=64, device="cuda")
    check_parity(impl, torch.bfloat16, hq=8, hkv=2, d=64, segment_ids=None, device="cuda")


def _attention_module():
    import importlib

    return importlib.import_module("megatron_unihetero.kernels.attention")


def test_layout_is_built_once_and_used_by_every_call():
    """attention_layout decides once; attend under that layout equals attention() per call,
    and a layout built for other segments gives other results (nothing is cached)."""
    module = _attention_module()
    q, k, v = (t.detach() for t in _qkv(3, 12, 4, 2, 8, torch.float32))
    layout = module.attention_layout(SEGMENTS, dtype=q.dtype, device=q.device, impl="reference")
    assert layout.impl == "reference" and isinstance(layout.plan, module.DenseMask)
    first = module.attend(q, k, v, layout)
    assert torch.equal(first, attention(q, k, v, segment_ids=SEGMENTS, impl="reference"))
    seg = SEGMENTS.clone()
    seg[0, 1:3] = 5  # split a document: a new layout
    changed = module.attend(q, k, v, module.attention_layout(seg, dtype=q.dtype, device=q.device))
    assert_close(changed, loop_reference(q, k, v, seg), torch.float32, msg="other layout")
    assert not torch.equal(changed, first)
    causal = module.attention_layout(None, dtype=q.dtype, device=q.device)
    assert causal.plan is None and causal.segment_ids is None
    with pytest.raises(ValueError, match="segment_ids must be"):
        module.attend(q, k, v, module.attention_layout(seg[:, :6], dtype=q.dtype, device=q.device))


def test_documents_path_is_taken_only_where_it_pays():
    module = _attention_module()

    def rows(b, s, docs):
        return torch.arange(s).div(s // docs, rounding_mode="floor").repeat(b, 1)

    def batched(seg):
        return isinstance(module._reference_plan(seg, torch.float32), module.DocumentBatch)

    assert not batched(rows(8, 128, 2)) and batched(rows(8, 128, 4))  # short rows: 4x fewer scores
    assert batched(rows(4, 256, 2)) and batched(rows(2, 1024, 2))
    # SEGMENTS: 6 documents padded to 12 cost more than 3 dense rows of 12.
    assert not batched(SEGMENTS)
    assert not batched(torch.full((2, 4), -1))  # nothing but padding
    # One document per row and no padding: plain causal attention, nothing gathered.
    assert module._reference_plan(torch.zeros(2, 16, dtype=torch.long), torch.float32) is None
    dense = module._reference_plan(SEGMENTS, torch.bfloat16)
    assert isinstance(dense, module.DenseMask) and dense.additive.dtype == torch.bfloat16
    assert dense.keep is not None and dense.keep[0, 9:].sum() == 0  # row 0 ends in padding
    assert module.dense_mask(SEGMENTS.clamp(min=0), torch.float32).keep is None
    for seg in (SEGMENTS, SEGMENTS.clamp(min=0)):  # with padding and without: the same rule
        additive = module.dense_mask(seg, torch.float32).additive
        assert torch.equal(additive == 0, block_causal_mask(seg))
        assert torch.isneginf(additive[additive != 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_documents_path_matches_loop(dtype, hq, hkv):
    """Forced onto SEGMENTS (uneven documents, padding at a row's end, a one-token document),
    and on a transposed [s, b] view as megatron hands it: forward and backward."""
    module = _attention_module()
    b, s = SEGMENTS.shape
    layout = module.document_batch(SEGMENTS)
    assert (layout.num_docs, layout.max_len) == (6, 12)
    q, k, v = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
               for t in _qkv(b, s, hq, hkv, 16, dtype))
    out = module.attend(q, k, v, module.AttentionLayout("reference", SEGMENTS, layout))
    assert out.stride() == q.stride()  # scattered into the caller's memory layout
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad = grad * (SEGMENTS >= 0)[:, :, None, None]
    out.backward(grad)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = loop_reference(qr, kr, vr, SEGMENTS)
    ref.backward(grad.float())
    assert_close(out, ref, dtype, msg="documents out")
    assert out[0, 9:].abs().max() == 0  # padding tokens
    for name, t, r in (("q", q, qr), ("k", k, kr), ("v", v, vr)):
        assert_close(t.grad, r.grad, dtype, msg=f"documents grad {name}")
