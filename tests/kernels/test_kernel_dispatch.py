"""The impl switch: optional libraries never break imports, "auto", the env override, and the
dispatch tables (which implementation actually ran)."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from torch import nn

from megatron_unihetero.kernels import (
    apply_rope,
    attention,
    cross_entropy,
    fused_linear_cross_entropy,
    fused_regression_loss,
    regression,
    rms_norm,
    rmsnorm,
    rope,
    swiglu,
    swiglu_linear,
)
from megatron_unihetero.kernels._dispatch import ENV_VAR, REFERENCE, resolve_impl

# The module (kernels/__init__ exports a function of the same name).
attention_module = importlib.import_module("megatron_unihetero.kernels.attention")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Block the optional libraries (a None entry in sys.modules makes `import x` raise ImportError),
# then import and run every op with impl="auto" on CPU.
NO_OPTIONAL_LIBS = """
import sys
for name in ("triton", "flash_attn", "transformer_engine", "transformer_engine.pytorch", "apex"):
    sys.modules[name] = None
import torch
import megatron_unihetero.kernels as K
q = torch.randn(1, 6, 4, 8); kv = torch.randn(1, 6, 2, 8)
K.attention(q, kv, kv, segment_ids=torch.tensor([[0, 0, 1, 1, 1, -1]]))
K.fused_linear_cross_entropy(torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,)))
class Head(torch.nn.Module):  # the head protocol of fused_regression_loss
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 3)
    def features(self, h):
        return h
    def forward(self, h):
        return self.proj(h)
K.fused_regression_loss(Head(), torch.randn(5, 8), torch.randn(5, 3))
K.swiglu_linear(torch.randn(5, 8), torch.randn(6, 8))
K.rms_norm(torch.randn(2, 8), torch.ones(8))
K.apply_rope(q, torch.ones(1, 6, 1, 8), torch.zeros(1, 6, 1, 8))
try:
    K.rms_norm(torch.randn(2, 8), torch.ones(8), impl="triton")
except RuntimeError as exc:
    assert "not usable" in str(exc)
else:
    raise AssertionError("impl='triton' without triton must raise")
print("ok")
"""


def test_import_and_auto_work_without_optional_libraries():
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")  # interpret: triton *would* be picked
    out = subprocess.run([sys.executable, "-c", NO_OPTIONAL_LIBS], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_does_not_load_triton():
    code = "import sys, megatron_unihetero.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


class _Head(nn.Module):
    """The head protocol of fused_regression_loss: features, then the last linear ``proj``."""

    def __init__(self, h, d):
        super().__init__()
        self.proj = nn.Linear(h, d)

    def features(self, hidden):
        return hidden

    def forward(self, hidden):
        return self.proj(hidden)


def _cross_entropy_args(tokens=6, vocab=9):
    return torch.randn(tokens, 8), torch.randn(vocab, 8), torch.randint(0, vocab, (tokens,))


# op -> (its module, which holds the dispatch table _IMPLS; a call of the public op on CPU
# tensors, given impl; the impl "auto" picks there without the env override).
LARGE_CE_TOKENS = cross_entropy._REFERENCE_ON_CPU_MAX_LOGITS // 9 + 1  # past the small-logits rule
OPS = {
    "rms_norm": (rmsnorm, lambda impl: rms_norm(torch.randn(3, 8), torch.randn(8), impl=impl), "fused"),
    "apply_rope": (rope, lambda impl: apply_rope(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8),
                                                 torch.randn(1, 4, 1, 8), impl=impl), "fused"),
    "swiglu_linear": (swiglu, lambda impl: swiglu_linear(torch.randn(3, 8), torch.randn(6, 8), impl=impl),
                      "fused"),
    "fused_regression_loss": (regression, lambda impl: fused_regression_loss(
        _Head(8, 3), torch.randn(5, 8), torch.randn(5, 3), impl=impl), "fused"),
    "fused_linear_cross_entropy": (cross_entropy, lambda impl: fused_linear_cross_entropy(
        *_cross_entropy_args(tokens=LARGE_CE_TOKENS), impl=impl), "fused"),
    "fused_linear_cross_entropy (small logits)": (cross_entropy, lambda impl: fused_linear_cross_entropy(
        *_cross_entropy_args(), impl=impl), REFERENCE),
    # attention has no fused torch path: on CPU "auto" is its reference (SDPA) either way.
    "attention": (attention_module, lambda impl: attention(
        torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8),
        segment_ids=torch.tensor([[0, 0, 1, 1, 1, -1]]), impl=impl), REFERENCE),
}


def _spy_on_table(monkeypatch, module):
    """Wrap every entry of ``module._IMPLS``; returns the list of names that ran, in order."""
    ran = []
    for name, fn in list(module._IMPLS.items()):
        def spy(*args, _name=name, _fn=fn, **kwargs):
            ran.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setitem(module._IMPLS, name, spy)
    return ran


@pytest.mark.parametrize("op", OPS)
def test_env_makes_auto_run_the_reference(op, monkeypatch):
    module, call, _ = OPS[op]
    ran = _spy_on_table(monkeypatch, module)
    monkeypatch.setenv(ENV_VAR, "reference")
    call("auto")
    assert ran == [REFERENCE]


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_picks_the_expected_impl(op, monkeypatch):
    module, call, expected = OPS[op]
    ran = _spy_on_table(monkeypatch, module)
    monkeypatch.delenv(ENV_VAR, raising=False)
    call("auto")
    assert ran == [expected]


def test_every_op_has_one_reference_and_the_shared_vocabulary():
    for module in (cross_entropy, regression, rmsnorm, rope, swiglu):
        assert module.IMPLS == tuple(module._IMPLS) and module.IMPLS[0] == REFERENCE
        assert set(module.IMPLS) <= {REFERENCE, "fused", "triton", "apex"}, module.__name__


def test_explicit_impl_wins_over_the_env(monkeypatch):
    ran = _spy_on_table(monkeypatch, rmsnorm)
    monkeypatch.setenv(ENV_VAR, "reference")
    OPS["rms_norm"][1]("fused")
    assert ran == ["fused"]


@pytest.mark.parametrize("value", ["torch", "fused", "1"])
def test_unknown_env_value_is_an_error(value, monkeypatch):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='{value}'.*'reference'"):
        rms_norm(torch.randn(3, 8), torch.randn(8))


@pytest.mark.parametrize("op, old", [("rms_norm", "torch"), ("apply_rope", "torch"),
                                     ("swiglu_linear", "unfused"), ("swiglu_linear", "torch"),
                                     ("fused_linear_cross_entropy", "naive"),
                                     ("fused_regression_loss", "torch")])
def test_old_impl_names_are_rejected_with_the_valid_names(op, old):
    module, call, _ = OPS[op]
    with pytest.raises(ValueError, match=rf"{op}: unknown impl '{old}'; expected 'auto' or one of "
                                         rf"'reference', 'fused'"):
        call(old)
    assert old not in module.IMPLS


def test_cross_entropy_auto_on_cpu_is_the_reference_only_while_the_logits_are_small():
    limit = cross_entropy._REFERENCE_ON_CPU_MAX_LOGITS
    small, large = limit // 512, limit // 512 + 1
    weight = torch.empty(512, 8)
    assert cross_entropy.auto_order(torch.empty(small, 8), weight) == [REFERENCE, "fused"]
    assert cross_entropy.auto_order(torch.empty(large, 8), weight) == ["fused"]


@pytest.mark.parametrize("bad", ["cuda", "Reference", ""])
def test_unknown_impl_is_rejected(bad):
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 4), torch.ones(4), impl=bad)


def test_auto_takes_a_torch_path_inside_torch_compile():
    """Under train.compile, Inductor fuses the torch paths' ops itself (kernels/_dispatch.py):
    "auto" is fused where the op has it, else the reference."""
    chosen = []
    with_fused, without_fused = (REFERENCE, "fused", "triton"), (REFERENCE, "flash")

    def op(x):
        chosen.append(resolve_impl("x", "auto", with_fused, ["triton", "fused"]))
        chosen.append(resolve_impl("x", "auto", without_fused, ["flash", REFERENCE]))
        chosen.append(resolve_impl("x", "triton", with_fused, ["triton", "fused"]))
        return x + 1

    torch.compile(op, backend="eager")(torch.ones(2))  # traces op: no C++ compiler needed
    assert chosen == ["fused", REFERENCE, "triton"]  # an explicit request stands
    assert resolve_impl("x", "auto", with_fused, ["triton", "fused"]) == "triton"
