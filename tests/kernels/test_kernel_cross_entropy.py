"""Parity of fused_linear_cross_entropy (fused chunked torch, Triton, vocab-parallel) with the
full-logits reference, forward and backward, fp32 and bf16."""

import pytest
import torch
import torch.distributed as dist

from megatron_unihetero.kernels import fused_linear_cross_entropy
from megatron_unihetero.kernels._dispatch import ENV_VAR, REFERENCE, resolve_impl
from megatron_unihetero.kernels.cross_entropy import default_chunk_size
from megatron_unihetero.kernels.testing import assert_close
from megatron_unihetero.testing import run_distributed_test

IGNORE = -100


def _inputs(n, h, v, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5 * 2.0
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::5] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def _run(impl, hidden, weight, labels, grad_scale=0.5, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, count = fused_linear_cross_entropy(h, w, labels, ignore_index=IGNORE, impl=impl, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), count, h.grad, w.grad


def check_parity(impl, dtype, n=37, h=16, v=53, chunk_size=8, device="cpu"):
    """``impl`` on ``dtype`` inputs against the reference on the same values in fp32."""
    hidden, weight, labels = _inputs(n, h, v, dtype, device)
    loss, count, gh, gw = _run(impl, hidden, weight, labels, chunk_size=chunk_size)
    ref_loss, ref_count, ref_gh, ref_gw = _run("reference", hidden.float(), weight.float(), labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert count.dtype == torch.int64 and int(count) == int(ref_count) == int((labels != IGNORE).sum())
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(loss, ref_loss, dtype, scale=n, msg=f"{impl} loss")
    assert_close(gh, ref_gh, dtype, msg=f"{impl} grad hidden")
    assert_close(gw, ref_gw, dtype, msg=f"{impl} grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [8, 37, None])  # uneven last chunk, one chunk, default
def test_fused_matches_reference(dtype, chunk_size):
    check_parity("fused", dtype, chunk_size=chunk_size)


def test_reference_matches_plain_cross_entropy():
    hidden, weight, labels = _inputs(20, 8, 11, torch.float32)
    loss, count = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, impl="reference")
    mask = labels != IGNORE
    expected = torch.nn.functional.cross_entropy(hidden[mask] @ weight.t(), labels[mask], reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert int(count) == int(mask.sum())


def test_no_grad_and_all_ignored():
    hidden, weight, labels = _inputs(16, 8, 11, torch.float32)
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, impl="fused")
    ref, _ = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, impl="reference")
    torch.testing.assert_close(loss, ref.detach())
    loss, count, gh, gw = _run("fused", hidden, weight, torch.full_like(labels, IGNORE), chunk_size=4)
    assert float(loss) == 0.0 and int(count) == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_default_chunk_is_bounded():
    assert default_chunk_size(8192, 32000) == 256
    assert default_chunk_size(8192, 32000, "cuda") == 1024
    assert default_chunk_size(10, 32000) == 10
    assert default_chunk_size(100_000, 10) == 100_000  # small vocab: one chunk
    assert default_chunk_size(8192, 100_000) == 64  # huge vocab: at least 64 rows


def test_env_forces_reference(monkeypatch):
    valid = (REFERENCE, "fused", "triton")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_impl("x", "auto", valid, ["triton", "fused"]) == REFERENCE
    assert resolve_impl("x", "triton", valid, ["triton", "fused"]) == "triton"
    monkeypatch.delenv(ENV_VAR)
    assert resolve_impl("x", "auto", valid, ["triton", "fused"]) == "triton"
    with pytest.raises(ValueError):
        resolve_impl("x", "cuda_magic", valid, ["fused"])


# ----------------------------------------------------------------- tensor parallel (gloo, 2 ranks)

def _tp_worker(cases):
    """Each rank holds a vocab shard; the loss, the hidden gradient and the weight-gradient shard
    must equal the single-rank result on the full weight. One spawn for all cases (spawning
    costs seconds)."""
    group = dist.group.WORLD
    for impl, dtype in cases:
        _tp_case(group, impl, dtype)


def _tp_case(group, impl, dtype):
    rank, world = dist.get_rank(), dist.get_world_size()
    n, h, v = 29, 12, 2 * 17
    hidden, weight, labels = _inputs(n, h, v, dtype)  # same seed: identical on every rank
    shard = slice(rank * v // world, (rank + 1) * v // world)
    loss, count, gh, gw = _run(impl, hidden, weight[shard], labels, tp_group=group, chunk_size=8)
    ref_loss, ref_count, ref_gh, ref_gw = _run("reference", hidden.float(), weight.float(), labels)
    assert int(count) == int(ref_count)
    assert_close(loss, ref_loss, dtype, scale=n, msg=f"{impl} {dtype} rank {rank} loss")
    assert_close(gh, ref_gh, dtype, msg=f"{impl} {dtype} rank {rank} grad hidden (must be the all-reduced one)")
    assert_close(gw, ref_gw[shard], dtype, msg=f"{impl} {dtype} rank {rank} grad weight shard")
    # Same loss bit-for-bit on every rank.
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss)
    assert all(torch.equal(x, losses[0]) for x in losses)


def test_vocab_parallel_matches_single_rank():
    cases = [("fused", torch.float32), ("fused", torch.bfloat16), ("reference", torch.float32)]
    run_distributed_test(_tp_worker, 2, cases)


# ----------------------------------------------------------------- Triton: interpreted and compiled

def interpreted_cases():
    """Run by test_kernel_triton_interpret.py in a child process with TRITON_INTERPRET=1."""
    for dt in (torch.float32, torch.bfloat16):
        check_parity("triton", dt, n=21, h=8, v=37, chunk_size=8)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_matches_reference(dtype):
    check_parity("triton", dtype, n=1000, h=256, v=5003, chunk_size=256, device="cuda")
    check_parity("auto", dtype, n=1000, h=256, v=5003, chunk_size=None, device="cuda")


if __name__ == "__main__":
    interpreted_cases()
