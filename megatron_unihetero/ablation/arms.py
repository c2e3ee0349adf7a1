"""The five arms of the paper's objective ablation: und-only, +semantic, +pixel (shared and
hetero routing), +semantic+pixel (hetero)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_unihetero.models.config import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "examples", "configs", "ablation")


@dataclass(frozen=True)
class Arm:
    name: str
    semantic: bool  # model.semantic.weight > 0
    pixel_routing: Optional[str]  # None: model.pixel.weight == 0; else shared | hetero
    label: str

    @property
    def config(self) -> str:
        return arm_config_path(self.name)


ARMS: Dict[str, Arm] = {a.name: a for a in (
    Arm("und_only", False, None, "und-only"),
    Arm("semantic", True, None, "+semantic"),
    Arm("pixel_shared", False, "shared", "+pixel (shared)"),
    Arm("pixel_hetero", False, "hetero", "+pixel (hetero)"),
    Arm("semantic_pixel_hetero", True, "hetero", "+semantic +pixel (hetero)"),
)}


def arm_config_path(name: str, config_dir: str = CONFIG_DIR) -> str:
    return os.path.join(config_dir, f"{name}.yaml")


def check_arm_config(arm: Arm, cfg) -> None:
    """Raise ConfigError unless ``cfg`` (a RunConfig) has exactly the arm's objective switches."""
    sem, pix = cfg.model.semantic, cfg.model.pixel
    if sem.enabled != arm.semantic:
        raise ConfigError(f"arm {arm.name}: model.semantic.weight={sem.weight}, expected "
                          f"{'> 0' if arm.semantic else '0'}")
    if arm.pixel_routing is None:
        if pix.enabled:
            raise ConfigError(f"arm {arm.name}: model.pixel.weight={pix.weight}, expected 0")
    else:
        if not pix.enabled:
            raise ConfigError(f"arm {arm.name}: model.pixel.weight=0, expected > 0")
        if pix.routing != arm.pixel_routing:
            raise ConfigError(f"arm {arm.name}: model.pixel.routing={pix.routing!r}, expected "
                              f"{arm.pixel_routing!r}")
