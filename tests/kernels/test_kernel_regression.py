"""fused_regression_loss: the one-pass paths (fused torch math, Triton) against the plain
autograd reference, forward and backward, for mse / smooth_l1 / cosine, fp32 and bf16, with and
without bias; and a head whose features are not the identity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_unihetero.kernels import fused_regression_loss
from megatron_unihetero.kernels.testing import assert_close

LOSSES = ["mse", "smooth_l1", "cosine"]


def _inputs(n, h, d, dtype, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(d, h, generator=gen) / h**0.5
    b = torch.randn(d, generator=gen) * 0.1 if bias else None
    target = torch.randn(n, d, generator=gen) * 1.5  # straddles the smooth-L1 kink at |diff| = 1
    target[0] = 0.0  # a zero target vector: exercises the cosine eps clamp
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), cast(target)


class LinearHead(nn.Module):
    """The head protocol fused_regression_loss takes: features (identity here), then proj."""

    def __init__(self, weight, bias):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                              dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            if bias is not None:
                self.proj.bias.copy_(bias)

    def features(self, hidden):
        return hidden

    def forward(self, hidden):
        return self.proj(self.features(hidden))


def _run(impl, hidden, weight, bias, target, loss):
    head = LinearHead(weight, bias)
    h = hidden.detach().clone().requires_grad_()
    tgt = target.detach().clone().requires_grad_()  # must NOT receive a gradient
    out = fused_regression_loss(head, h, tgt, loss=loss, impl=impl)
    (out * 0.75).backward()
    assert tgt.grad is None
    return out.detach(), [h.grad, head.proj.weight.grad, head.proj.bias.grad if bias is not None else None]


def check_parity(impl, dtype, loss, n=19, h=24, d=10, bias=True, device="cpu"):
    inputs = _inputs(n, h, d, dtype, device, bias)
    out, grads = _run(impl, *inputs, loss)
    ref, ref_grads = _run("reference", *[None if t is None else t.float() for t in inputs], loss)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close(out, ref, dtype, scale=n, msg=f"{impl} {loss} loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close(g, r, dtype, msg=f"{impl} {loss} grad {name}")


def test_reference_definitions():
    hidden, weight, bias, target = _inputs(7, 6, 5, torch.float64)
    pred = hidden @ weight.t() + bias
    expected = {
        "mse": ((pred - target) ** 2).mean(-1).sum(),
        "smooth_l1": F.smooth_l1_loss(pred, target, reduction="none").mean(-1).sum(),
        "cosine": (1 - F.cosine_similarity(pred, target, dim=-1)).sum(),
    }
    for loss, value in expected.items():
        got = fused_regression_loss(LinearHead(weight, bias), hidden, target, loss=loss, impl="reference")
        torch.testing.assert_close(got.double(), value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_autograd(dtype, loss, bias):
    check_parity("fused", dtype, loss, bias=bias)


class MLPHead(nn.Module):
    def __init__(self, h, d):
        super().__init__()
        self.fc1, self.proj = nn.Linear(h, h, dtype=torch.float64), nn.Linear(h, d, dtype=torch.float64)

    def features(self, hidden):
        return torch.tanh(self.fc1(hidden))

    def forward(self, hidden):
        return self.proj(self.features(hidden))


@pytest.mark.parametrize("loss", LOSSES)
def test_fused_backpropagates_through_the_head_features(loss):
    """The one-pass path takes the head, not its parts: gradients reach the layers before proj."""
    torch.manual_seed(0)
    head = MLPHead(6, 4)
    hidden, target = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "fused"):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        out = fused_regression_loss(head, h, target, loss=loss, impl=impl)
        out.backward()
        grads[impl] = [out.detach(), h.grad] + [p.grad.clone() for p in head.parameters()]
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_fused_and_rejects_unknown_loss():
    hidden, weight, bias, target = _inputs(4, 6, 5, torch.float32)
    hidden.requires_grad_()
    head = LinearHead(weight, bias)
    out = fused_regression_loss(head, hidden, target)
    assert type(out.grad_fn).__name__.startswith("_FusedRegression")
    with pytest.raises(ValueError, match="unknown regression loss 'l3'"):
        fused_regression_loss(head, hidden, target, loss="l3")
    with pytest.raises(ValueError, match=r"target \[N, 5\]"):
        fused_regression_loss(head, hidden, target[:, :4])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_prediction_stats_come_from_the_same_pass(impl):
    """The diagnostics' statistics ride out of the loss pass (no second head pass): equal to
    regression_stats of the head's own prediction, detached, with the loss and its gradients
    unchanged."""
    from megatron_unihetero.eval.diagnostics import regression_stats

    torch.manual_seed(0)
    head = MLPHead(6, 4)
    hidden, target = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    plain = fused_regression_loss(head, h, target, impl=impl)
    plain.backward()
    plain_grad = h.grad.clone()
    h.grad = None
    out, stats = fused_regression_loss(head, h, target, impl=impl, prediction_stats=regression_stats)
    out.backward()
    assert not stats.requires_grad
    torch.testing.assert_close(stats, regression_stats(head(hidden), target))
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(h.grad, plain_grad)


def interpreted_cases():
    """Run by test_kernel_triton_interpret.py in a child process with TRITON_INTERPRET=1."""
    for dtype in (torch.float32, torch.bfloat16):
        for loss in LOSSES:
            check_parity("triton", dtype, loss, n=9, h=8, d=12)
    check_parity("triton", torch.float32, "cosine", n=5, h=8, d=6, bias=False)


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_gpu_matches_autograd(dtype, loss):
    check_parity("triton", dtype, loss, n=2048, h=512, d=1024, device="cuda")
    check_parity("auto", dtype, loss, n=300, h=64, d=100, device="cuda")


if __name__ == "__main__":
    interpreted_cases()
