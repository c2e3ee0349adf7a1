"""The CPU layer for megatron-core: megatron sees a CPU 'cuda', user code sees real torch."""

import sys

import pytest
import torch

from megatron_unihetero import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is off with CUDA")


def test_megatron_modules_see_the_proxy_and_user_code_does_not():
    platform.prepare_megatron()
    from megatron.core.tensor_parallel import layers

    proxy = layers.torch
    assert proxy is not torch
    assert proxy.cuda.current_device() == torch.device("cpu")
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.tensor([1.0], device="cuda:1").device.type == "cpu"
    with proxy.autocast("cuda", dtype=torch.bfloat16):
        pass
    # The real torch is untouched for everyone else.
    assert sys.modules["torch"] is torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_modules_imported_after_install_are_patched_too():
    platform.prepare_megatron()
    name = "megatron.core.energy_monitor"
    sys.modules.pop(name, None)
    import importlib

    module = importlib.import_module(name)
    assert getattr(module, "torch", None) is not torch


def test_cpu_rng_state_round_trips_through_the_proxy():
    platform.prepare_megatron()
    from megatron.core.tensor_parallel import random as mp_random

    cuda = mp_random.torch.cuda
    state = cuda.get_rng_state()
    first = torch.rand(3)
    cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_tensor_type_names_cpu_tensors_as_cuda_for_megatron_only():
    """megatron-core's optimizers dispatch on ``param.type()``; user code keeps torch's answer."""
    import types

    platform.prepare_megatron()
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert x.type() == "torch.BFloat16Tensor"
    assert x.type(torch.float32).dtype == torch.float32  # the conversion form is untouched
    module = types.ModuleType("megatron.core._type_probe")
    exec("def name_of(t):\n    return t.type()\n", module.__dict__)
    assert module.name_of(x) == "torch.cuda.BFloat16Tensor"
    assert module.name_of(torch.zeros(1)) == "torch.cuda.FloatTensor"
