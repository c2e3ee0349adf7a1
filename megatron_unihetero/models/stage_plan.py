"""Which modules one pipeline stage of the UniHetero model holds: decided here, once.

    plan = StagePlan.build(model_config, pre_process=True, post_process=False)

The model (models/unihetero.py, also for what its checkpoint calls a copy) and the
semantic-target sync (parallel/) read this object; neither decides for itself. A module the plan leaves out is ``None`` on the model.

The rules:
- first stage (``pre_process``): the vision encoder, the projector and the token embedding;
- last stage (``post_process``): the final norm, the LM head; with semantic generation on, the
  semantic head; with pixel generation on, the pixel head and (``latent_source: vae``) a frozen
  VAE that encodes the batch's images there;
- semantic targets on the last stage. The target of the semantic head is a stop-gradient
  function of the image only (the projector output, an EMA copy of it, or the encoder output),
  never of the LLM, so the last stage recomputes it instead of receiving it with the
  activations (which would double the pipeline traffic). It then holds a frozen copy of the
  vision encoder, and for projector-space targets a ``target_projector``: an exact mirror of
  the first stage's projector at PP > 1 (``mirror``: copied after every optimizer step), or its
  EMA copy (``ema``, at any PP). With one stage and ``input_embedding`` targets the projector's
  own output is the target and no copy exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from megatron_unihetero.models.config import ModelConfig

MIRROR = "mirror"
EMA = "ema"
TARGET_PROJECTOR_PREFIX = "target_projector."


@dataclass(frozen=True)
class StagePlan:
    pre_process: bool  # first pipeline stage
    post_process: bool  # last pipeline stage
    vision: bool  # the vision encoder (first stage; last stage when it recomputes targets)
    projector: bool
    target_projector: Optional[str]  # None | MIRROR | EMA: the last stage's projector copy
    semantic_head: bool
    pixel_head: bool
    pixel_vae: bool

    @classmethod
    def build(cls, config: ModelConfig, pre_process: bool, post_process: bool) -> "StagePlan":
        semantic = config.semantic
        semantic_here = post_process and semantic.enabled
        projector_targets = semantic.target != "encoder_output"
        if not (semantic_here and projector_targets):
            target_projector = None
        elif semantic.target == "ema_input_embedding":
            target_projector = EMA
        elif not pre_process:
            target_projector = MIRROR
        else:
            target_projector = None  # one stage: the projector output itself is the target
        pixel_here = post_process and config.pixel.enabled
        return cls(
            pre_process=pre_process, post_process=post_process,
            vision=pre_process or semantic_here,
            projector=pre_process,
            target_projector=target_projector,
            semantic_head=semantic_here,
            pixel_head=pixel_here,
            pixel_vae=pixel_here and config.pixel.latent_source == "vae",
        )

    @property
    def is_middle(self) -> bool:
        """A stage with neither end: LLM layers only."""
        return not (self.pre_process or self.post_process)

    def copies(self) -> Dict[str, str]:
        """State this stage holds as a copy of another stage's: ``{local prefix: the original's
        prefix}``. A checkpoint stores the original once (the first stage's); the copy is
        written as its replica and loads from it, at any pipeline size: the last stage's
        encoder (it recomputes semantic targets) and the ``mirror`` of the projector."""
        copies = {}
        if self.vision and not self.pre_process:
            copies["vision."] = "vision."
        if self.target_projector == MIRROR:
            copies[TARGET_PROJECTOR_PREFIX] = "projector."
        return copies
