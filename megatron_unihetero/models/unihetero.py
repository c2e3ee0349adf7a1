"""UniHeteroModel: vision encoder -> projector -> interleaver -> LLM -> heads.

One pipeline stage of the model is built from ``pre_process`` (first stage: vision encoder,
projector, embeddings) and ``post_process`` (last stage: final norm, LM head, semantic head).

How the semantic-generation targets reach the last stage (DESIGN.md section 3): the target of
the semantic head is a stop-gradient function of the image only (the projector output, an EMA
copy of it, or the encoder output), never of the LLM. So instead of sending targets alongside
the activations (doubling pipeline traffic), the last stage recomputes them: it keeps a frozen
copy of the vision encoder and a ``target_projector`` that is either an exact mirror of the
projector (synced from the first stage after every optimizer step) or its EMA copy. At PP=1 the
projector output itself is used (``input_embedding``) and no copy exists. The sync lives in
:mod:`megatron_unihetero.parallel.semantic_sync`; tests show PP=2 equals PP=1.

Pixel generation (optional, ``config.pixel``): the last stage also holds the diffusion head
(models/pixel.py) and, with ``latent_source: vae``, a frozen VAE (models/vae.py) that encodes
the batch's images into latent tokens there; with ``latent_source: batch`` the latents come
precomputed as the batch key ``image_latents`` [n_img, T, C_lat].
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_unihetero.models import interleaver
from megatron_unihetero.models.config import IGNORE_INDEX, ModelConfig
from megatron_unihetero.models.heads import LossAndCount, SemanticHead, semantic_loss, text_loss
from megatron_unihetero.models.llm import LlamaDecoder
from megatron_unihetero.models.pixel import PixelHead, pixel_loss
from megatron_unihetero.models.projector import Projector
from megatron_unihetero.models.vision import (
    VisionEncoder,
    image_normalization,
    load_hf_vision_config,
    tokens_per_image,
)

# The vision encoder is built under this seed on every stage that holds one, so a randomly
# initialised encoder (tests, tiny runs) is the same on the first and the last stage.
VISION_INIT_SEED = 1234


def _build_vision(config: ModelConfig) -> VisionEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_INIT_SEED)
        return VisionEncoder(config.vision)


def _drop_empty_extra_state(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k, v in state_dict.items() if v is None and k.endswith("_extra_state")]:
        del state_dict[key]


class UniHeteroModel(MegatronModule):
    def __init__(self, config: ModelConfig, transformer_config: TransformerConfig, *,
                 pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None):
        super().__init__(config=transformer_config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        # megatron's linears (without TransformerEngine) report their extra state as None: not
        # state, and a None in a state dict breaks tools that read it (DeepSpeed's universal
        # checkpoint conversion). TE's real extra state (FP8 metadata) is kept.
        self.register_state_dict_post_hook(_drop_empty_extra_state)
        self.vp_stage = vp_stage  # this chunk's virtual pipeline stage (interleaved 1F1B)
        self.cfg = config
        self.pre_process = pre_process
        self.post_process = post_process
        semantic = config.semantic

        # The vision side: on the first stage, and on the last when it must recompute targets.
        needs_targets_here = post_process and semantic.enabled
        recompute_targets = needs_targets_here and (
            not pre_process or semantic.target == "ema_input_embedding")
        if pre_process or needs_targets_here:
            self.vision = _build_vision(config)
        encoder_dim = load_hf_vision_config(config.vision).hidden_size
        self.tokens_per_image = tokens_per_image(config.vision)
        if pre_process:
            self.projector = Projector(encoder_dim, config.llm.hidden_size)
            if config.projector.frozen:
                self.projector.requires_grad_(False)
        if recompute_targets and semantic.target != "encoder_output":
            self.target_projector = Projector(encoder_dim, config.llm.hidden_size)
            self.target_projector.requires_grad_(False)

        self.llm = LlamaDecoder(config.llm, transformer_config, pre_process=pre_process,
                                post_process=post_process, vp_stage=vp_stage)
        if config.freeze_llm:
            self.llm.requires_grad_(False)
        if needs_targets_here:
            target_dim = encoder_dim if semantic.target == "encoder_output" else config.llm.hidden_size
            self.semantic_head = SemanticHead(config.llm.hidden_size, target_dim, semantic.head)
        if post_process and config.pixel.enabled:
            self._build_pixel(config)

    def _build_pixel(self, config: ModelConfig) -> None:
        from megatron_unihetero.models import vae as vae_lib

        grid = vae_lib.vision_grid(self.tokens_per_image)
        pixel_vae = None
        if config.pixel.latent_source == "vae":
            image_size = load_hf_vision_config(config.vision).image_size
            mean, std = image_normalization(config.vision)
            pixel_vae = vae_lib.PixelVAE(config.pixel, grid, image_size, mean, std)
            self.pixel_vae = pixel_vae
        token_dim = vae_lib.latent_token_dim(config.pixel, pixel_vae)
        self.pixel_head = PixelHead(config.pixel, config.llm.hidden_size, token_dim)

    # -- pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    # -- pieces ------------------------------------------------------------------------------
    def vision_features(self, images: Optional[torch.Tensor],
                        image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Encoder features [n, T, d_enc], from pixels or from precomputed features."""
        if image_features is not None:
            return image_features
        return self.vision(images)

    def semantic_targets(self, features: torch.Tensor,
                         visual_embeddings: Optional[torch.Tensor]) -> torch.Tensor:
        """Stop-gradient regression targets per image token [n, T, D]."""
        target = self.cfg.semantic.target
        with torch.no_grad():
            if target == "encoder_output":
                return features.detach()
            if hasattr(self, "target_projector"):
                return self.target_projector(features)
            return visual_embeddings.detach()

    def _layout(self, tokens, segment_ids, num_images: int) -> interleaver.Layout:
        if tokens.shape[1] > self.cfg.llm.max_sequence_length:
            raise interleaver.InterleaveError(
                f"batch rows are {tokens.shape[1]} tokens long, more than "
                f"model.llm.max_sequence_length={self.cfg.llm.max_sequence_length}; pack or "
                f"truncate to at most that length (interleaver.layout(max_length=...))")
        return interleaver.layout(
            tokens, image_token_id=self.cfg.image_token_id,
            tokens_per_image=self.tokens_per_image, num_images=num_images,
            segment_ids=segment_ids,
        )

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None,
                image_latents: Optional[torch.Tensor] = None):
        """First/middle stages return hidden states [s, b, h]; the last stage returns
        ``{objective: (loss_sum, token_count)}`` when labels are given, else hidden states.
        ``image_latents`` [n_img, T, C_lat]: precomputed pixel targets (pixel objective)."""
        num_images = _num_images(images, image_features)
        if not (self.pre_process or self.post_process):
            return self.llm(None, position_ids, segment_ids)  # a middle pipeline stage
        layout = self._layout(tokens, segment_ids, num_images)
        features = visual = None
        if num_images and (self.pre_process or hasattr(self, "semantic_head")):
            features = self.vision_features(images, image_features)

        decoder_input = None
        if self.pre_process:
            embeddings = self.llm.embed(tokens)  # [s, b, h]
            if num_images:
                visual = self.projector(features)
                embeddings = interleaver.scatter_visual(
                    embeddings.transpose(0, 1), visual, layout).transpose(0, 1)
            decoder_input = embeddings

        hidden = self.llm(decoder_input, position_ids, segment_ids)
        if not self.post_process or labels is None:
            return hidden
        latents = None
        if hasattr(self, "pixel_head") and num_images:
            latents = self.pixel_latents(images, image_latents)
        return self.losses(hidden, labels, layout, features, visual, latents=latents)

    def pixel_latents(self, images: Optional[torch.Tensor],
                      image_latents: Optional[torch.Tensor]) -> torch.Tensor:
        """Latent tokens [n, T, C_lat]: precomputed in the batch, or VAE-encoded here."""
        if image_latents is not None:
            return image_latents
        if not hasattr(self, "pixel_vae") or images is None:
            raise ValueError(
                "the pixel objective needs latent targets: give the batch key 'image_latents' "
                "[n_img, T, C_lat], or raw 'images' with model.pixel.latent_source=vae")
        return self.pixel_vae.encode(images)

    def losses(self, hidden, labels, layout, features, visual,
               latents=None) -> Dict[str, LossAndCount]:
        """Each objective's (loss sum, token count) from the last stage's hidden [s, b, h].

        The heads read the rows of ``hidden`` in its memory order: [s, b] from megatron's
        block, [b, s] from the decoder's batch-first plain path (a transposed view). Either is
        a free view, and the gradient then comes back contiguous, as the linears want it
        (with a transposed one, each of them copies it twice in its backward).
        """
        s, b, h = hidden.shape
        batch_major = not hidden.is_contiguous() and hidden.transpose(0, 1).is_contiguous()
        rows = (hidden.transpose(0, 1) if batch_major else hidden).reshape(s * b, h)

        def in_row_order(per_position_bs: torch.Tensor) -> torch.Tensor:
            return (per_position_bs if batch_major else per_position_bs.t()).reshape(-1)

        # Text: every position, padding ignored through its label.
        text_labels = in_row_order(labels.masked_fill(layout.segment_ids < 0, IGNORE_INDEX))
        out = {"text": text_loss(self.llm.output_layer, rows, text_labels,
                                 self.cfg.image_token_id, impl=self.cfg.llm.loss_impl)}
        if hasattr(self, "semantic_head"):
            sem_hidden = _rows_at(rows, layout.semantic_mask, b, batch_major)
            if features is not None:
                targets = interleaver.semantic_targets(self.semantic_targets(features, visual), layout)
            else:
                targets = sem_hidden.new_zeros(0, self.semantic_head.proj.out_features)
            out["semantic"] = semantic_loss(self.semantic_head, sem_hidden, targets,
                                            self.cfg.semantic.loss, impl=self.cfg.semantic.loss_impl)
        if hasattr(self, "pixel_head"):
            cond = self.pixel_head.condition(hidden.transpose(0, 1), layout.semantic_mask,
                                             layout.segment_ids)
            if latents is not None:
                pixel_targets = interleaver.semantic_targets(latents.detach(), layout)
            else:
                pixel_targets = cond.new_zeros(0, self.pixel_head.token_dim)
            out["pixel"] = pixel_loss(self.pixel_head, cond, pixel_targets)
        return out


def _rows_at(rows: torch.Tensor, mask_bs: torch.Tensor, batch: int, batch_major: bool) -> torch.Tensor:
    """The rows of ``rows`` ([s * b, h], in [b, s] order when ``batch_major``, else [s, b]) where
    ``mask_bs`` [b, s] is True, listed in [b, s] order (the interleaver's order of visual tokens
    and their targets)."""
    b_idx, s_idx = mask_bs.nonzero(as_tuple=True)
    seq = mask_bs.shape[1]
    return rows.index_select(0, b_idx * seq + s_idx if batch_major else s_idx * batch + b_idx)


def _num_images(images, image_features) -> int:
    if image_features is not None:
        return int(image_features.shape[0])
    if images is not None:
        return int(images.shape[0])
    return 0
