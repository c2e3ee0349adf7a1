"""Run megatron-core on machines without CUDA (CPU + gloo), for tests and small runs.

megatron-core 0.16 is CUDA-only by construction: it calls ``torch.cuda.current_device()``,
builds tensors with ``device="cuda"`` and forks CUDA RNG states on its hot paths (about 190
sites). Rather than patch each site, every ``megatron.core.*`` module gets, as its ``torch``
global, a proxy of ``torch`` that:

* forwards every attribute to the real ``torch``, except
* ``cuda``: an object whose ``current_device()`` is the CPU, whose RNG calls use the CPU
  generator and whose streams / synchronize / memory queries are harmless no-ops (and
  ``torch.cuda._lazy_call``, imported by name, runs its callable at once);
* the tensor factories (``zeros``, ``empty``, ``tensor``, ...) and ``device``: a CUDA device
  argument becomes the CPU;
* ``autocast("cuda")`` becomes ``autocast("cpu")``.

The proxy is installed by an import hook, so modules megatron-core imports lazily are covered
too. Only ``megatron.core`` sees it: user code and the rest of torch are untouched. It is
active only when CUDA is absent (see :func:`install`), and pinned to the megatron-core versions
it was checked against, because the set of sites it must cover changes between releases.
The global changes are two: ``Tensor.cuda`` / ``Module.cuda`` become the identity (on CPU-only
builds they could only raise), and ``Tensor.type()`` names CPU tensors as CUDA ones when, and
only when, the caller is a ``megatron.core`` module (its optimizers dispatch on those names; this
is what lets the distributed optimizer run on CPU with gloo).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from typing import Any

import torch

SUPPORTED_MEGATRON_CORE = ("0.16.",)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "linspace",
    "rand", "randn", "randint", "randperm", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "eye", "empty_strided",
)

_installed = False
logger = logging.getLogger(__name__)


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (str, int index, torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__doc__ = fn.__doc__
    return factory


def _cpu_device(*args, **kwargs):
    if args and isinstance(args[0], str) and args[0].startswith("cuda"):
        return torch.device("cpu")
    if kwargs.get("type", "").startswith("cuda"):
        return torch.device("cpu")
    return torch.device(*args, **kwargs)


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _FakeEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.ModuleType):
    """Stands in for ``torch.cuda`` inside megatron-core when CUDA is absent."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        # Anything not overridden below falls through to the real torch.cuda
        # (constants, types, is_available() -> False, ...).
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def set_device(*args, **kwargs):
        pass

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def manual_seed(seed):
        # megatron seeds its CUDA generator per TP rank; on CPU the one default generator
        # was already seeded by the caller, and re-seeding here would change the CPU stream.
        pass

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    # megatron-core's activation-recompute checkpoint and its RNG tracker's fork (sequence
    # parallelism) read the state through torch.cuda.random and set it on
    # torch.cuda.default_generators[i] (tensor_parallel/random.py): the CPU generator too.
    random = types.SimpleNamespace(get_rng_state=get_rng_state, set_rng_state=set_rng_state)
    default_generators = collections.defaultdict(lambda: torch.default_generator)

    @staticmethod
    def current_stream(*args, **kwargs):
        return _FakeStream()

    default_stream = current_stream
    Stream = _FakeStream
    Event = _FakeEvent

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def device(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def get_device_properties(*args, **kwargs):
        return types.SimpleNamespace(major=0, minor=0, name="cpu", total_memory=0)

    @staticmethod
    def get_device_capability(*args, **kwargs):
        return (0, 0)


class _TorchProxy(types.ModuleType):
    """``torch`` as megatron-core sees it on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        self.device = _cpu_device
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type="cuda", *args, **kwargs):
        if device_type == "cuda":
            device_type = "cpu"
        return torch.autocast(device_type, *args, **kwargs)


_PROXY = _TorchProxy()


def _run_now(callable, **kwargs):
    callable()


def _patch_module(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _PROXY
    # torch.cuda._lazy_call (imported by name in tensor_parallel/random.py) queues its callable
    # until CUDA initialises, which on CPU is never: an RNG state set through it would be lost
    # and each call would stay queued (with a formatted stack) for the life of the process.
    if getattr(module, "_lazy_call", None) is torch.cuda._lazy_call:
        module._lazy_call = _run_now


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_module(module)


class _MegatronCoreFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of every ``megatron.core`` module so it is patched once loaded."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_TENSOR_TYPE = torch.Tensor.type


def _type_as_seen_by_megatron(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` that names CPU tensors as CUDA ones when megatron-core asks.

    megatron-core's optimizers dispatch on type strings (``'torch.cuda.FloatTensor'``, ...),
    which a method call on a tensor bypasses the module proxy for. Only a no-argument call
    whose caller is a ``megatron.core`` module is answered so; every other caller sees torch's.
    """
    if dtype is None and not kwargs and self.device.type == "cpu":
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.core"):
            return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    if dtype is None:
        return _TENSOR_TYPE(self)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def install() -> bool:
    """Make megatron-core usable on CPU. Returns True when the layer was (or is) installed.

    A no-op when CUDA is available: on GPU machines nothing is patched. Installing it says so
    once, in an INFO record of this module's logger (the run's log file).
    """
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    from importlib.metadata import version

    mcore_version = version("megatron-core")
    if not mcore_version.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron_unihetero's CPU layer for megatron-core was checked against versions "
            f"{SUPPORTED_MEGATRON_CORE}, found {mcore_version}; pin megatron-core==0.16.1 or "
            f"re-check megatron_unihetero/platform/megatron_cpu.py against the new release."
        )
    sys.meta_path.insert(0, _MegatronCoreFinder())
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _patch_module(module)
    # On a CPU-only torch build these can only raise; identity keeps megatron's
    # `.cuda()` calls on parameters and buffers working.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _type_as_seen_by_megatron
    _installed = True
    # Once per process, in the run's log (megatron_unihetero/console.py), not on the console.
    logger.info("no CUDA: megatron-core %s runs on the CPU layer (platform/megatron_cpu.py): "
                "megatron.core modules see a CPU torch.cuda; Tensor.cuda and Module.cuda are the "
                "identity; Tensor.type() names CPU tensors as CUDA ones for megatron.core callers",
                mcore_version)
    return True
