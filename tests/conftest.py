import os

import pytest
import torch

# Make the repo importable without installation (CI installs it, but a plain clone should work too).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    from megatron_unihetero import platform

    skips = {}
    if not torch.cuda.is_available():
        skips["requires_gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not platform.can_compile():
        skips["requires_compiler"] = pytest.mark.skip(reason="torch.compile on CPU needs a C++ compiler")
    for item in items:
        for keyword, skip in skips.items():
            if keyword in item.keywords:
                item.add_marker(skip)
