"""The arms of the objective ablation: the paper's five (und-only, +semantic, +pixel shared and
hetero, +semantic+pixel hetero) and the semantic variants the field uses:

- ``semantic_cosine``: cosine loss on the input-embedding target;
- ``semantic_ema``: the target from an EMA copy of the projector (GAS-style EMA target, which
  stops the trainable projector from chasing its own target);
- ``semantic_encoder``: the frozen encoder's output as the target, MSE (Emu2's regression);
- ``semantic_encoder_cosine``: the encoder's output, cosine loss (MetaMorph).
"""

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
    semantic_loss: str = "mse"  # model.semantic.loss (checked when semantic)
    semantic_target: str = "input_embedding"  # model.semantic.target (checked when semantic)

    @property
    def config(self) -> str:
        return arm_config_path(self.name)


ARMS: Dict[str, Arm] = {a.name: a for a in (
    Arm("und_only", False, None, "und-only"),
    Arm("semantic", True, None, "+semantic"),
    Arm("pixel_shared", False, "shared", "+pixel (shared)"),
    Arm("pixel_hetero", False, "hetero", "+pixel (hetero)"),
    Arm("semantic_pixel_hetero", True, "hetero", "+semantic +pixel (hetero)"),
    Arm("semantic_cosine", True, None, "+semantic (cosine)", semantic_loss="cosine"),
    Arm("semantic_ema", True, None, "+semantic (EMA target)", semantic_target="ema_input_embedding"),
    Arm("semantic_encoder", True, None, "+semantic (encoder target)", semantic_target="encoder_output"),
    Arm("semantic_encoder_cosine", True, None, "+semantic (encoder target, cosine)",
        semantic_loss="cosine", semantic_target="encoder_output"),
)}
# The paper's five: the default of a sweep that reproduces its ablation table.
PAPER_ARMS = ("und_only", "semantic", "pixel_shared", "pixel_hetero", "semantic_pixel_hetero")


def arm_config_path(name: str, config_dir: str = CONFIG_DIR) -> str:
    return os.path.join(config_dir, f"{name}.yaml")


def check_arm_config(arm: Arm, cfg) -> None:
    """Raise ConfigError unless ``cfg`` (a RunConfig) has exactly the arm's objective switches."""
    sem, pix = cfg.model.semantic, cfg.model.pixel
    if sem.enabled != arm.semantic:
        raise ConfigError(f"arm {arm.name}: model.semantic.weight={sem.weight}, expected "
                          f"{'> 0' if arm.semantic else '0'}")
    if arm.semantic:
        for key, want in (("loss", arm.semantic_loss), ("target", arm.semantic_target)):
            if getattr(sem, key) != want:
                raise ConfigError(f"arm {arm.name}: model.semantic.{key}={getattr(sem, key)!r}, "
                                  f"expected {want!r}")
    if arm.pixel_routing is None:
        if pix.enabled:
            raise ConfigError(f"arm {arm.name}: model.pixel.weight={pix.weight}, expected 0")
    else:
        if not pix.enabled:
            raise ConfigError(f"arm {arm.name}: model.pixel.weight=0, expected > 0")
        if pix.routing != arm.pixel_routing:
            raise ConfigError(f"arm {arm.name}: model.pixel.routing={pix.routing!r}, expected "
                              f"{arm.pixel_routing!r}")
