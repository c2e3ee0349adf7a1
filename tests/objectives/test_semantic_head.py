"""The semantic-generation head and its regression losses, against hand computations."""

import math

import pytest
import torch

from megatron_unihetero.kernels.regression import per_token_loss
from megatron_unihetero.models.heads import SemanticHead, semantic_loss


@pytest.mark.parametrize("kind", ["mse", "cosine", "smooth_l1"])
def test_loss_is_zero_when_prediction_equals_target(kind):
    x = torch.randn(5, 7)
    assert torch.allclose(per_token_loss(x, x.clone(), kind), torch.zeros(5), atol=1e-6)


def test_each_loss_matches_a_hand_computation():
    pred = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    # mse: mean over dims of squared differences
    torch.testing.assert_close(per_token_loss(pred, target, "mse"),
                               torch.tensor([(0 + 4 + 0.25) / 3, (0 + 1 + 9) / 3]))
    # smooth_l1 (beta 1): 0.5 d^2 if |d| < 1 else |d| - 0.5, mean over dims
    torch.testing.assert_close(per_token_loss(pred, target, "smooth_l1"),
                               torch.tensor([(0 + 1.5 + 0.125) / 3, (0 + 0.5 + 2.5) / 3]))
    # cosine: 1 - <p, t> / (|p| |t|)
    cos0 = 1.0 / (math.sqrt(5) * math.sqrt(1.25))
    torch.testing.assert_close(per_token_loss(pred, target, "cosine"),
                               torch.tensor([1 - cos0, 1.0]))
    with pytest.raises(ValueError):
        per_token_loss(pred, target, "l1")


@pytest.mark.parametrize("kind", ["mse", "cosine", "smooth_l1"])
def test_no_gradient_flows_into_the_target(kind):
    head = SemanticHead(6, 4, "mlp")
    hidden = torch.randn(3, 6, requires_grad=True)
    source = torch.randn(3, 4, requires_grad=True)
    target = source * 2.0  # a target that is part of a graph
    (loss, count), _ = semantic_loss(head, hidden, target, kind)
    assert int(count) == 3
    loss.backward()
    assert source.grad is None
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0


def test_semantic_loss_sums_per_token_losses():
    head = SemanticHead(4, 4, "linear")
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(4))
        head.proj.bias.zero_()
    hidden = torch.randn(5, 4)
    (loss, count), _ = semantic_loss(head, hidden, hidden, "mse")
    assert float(loss) < 1e-10 and int(count) == 5  # identity head: prediction == target
    target = hidden + 1.0
    (loss, _), _ = semantic_loss(head, hidden, target, "mse")
    torch.testing.assert_close(loss, torch.tensor(5.0))  # 5 tokens x mean((1)^2)
