"""UniHeteroModel: vision encoder -> projector -> interleaver -> LLM -> heads.

One pipeline stage of the model holds the modules its :class:`StagePlan` names
(models/stage_plan.py: built from the config and ``pre_process`` / ``post_process``); the
others are ``None``. The plan's docstring explains how the semantic-generation targets reach
the last stage (recomputed there from the image, never sent along the pipeline); the sync of
the last stage's projector copy after each optimizer step is
:func:`megatron_unihetero.parallel.sync_semantic_targets`.

Pixel generation (optional, ``config.pixel``): the last stage also holds the diffusion head
(models/pixel.py) and, with ``latent_source: vae``, a frozen VAE (models/vae.py) that encodes
the batch's images into latent tokens there; with ``latent_source: batch`` the latents come
precomputed as the batch key ``image_latents`` [n_img, T, C_lat]. With ``pixel.cond_dropout``
the first stage replaces, in training, some documents' captions before their image by the
null token (classifier-free guidance; models/pixel.py ``drop_conditions``).

The hidden states reaching the heads are megatron's [s, b, h], contiguous; the heads read them
as rows in that order ([s * b, h]) and every per-position tensor they use ([b, s] in the
batch) is put in the same order.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_unihetero.eval import diagnostics
from megatron_unihetero.models import interleaver
from megatron_unihetero.models.config import IGNORE_INDEX, ModelConfig
from megatron_unihetero.models.heads import ModelLosses, SemanticHead, semantic_loss, text_loss
from megatron_unihetero.models.llm import LlamaDecoder
from megatron_unihetero.models.pixel import PixelHead, drop_conditions, pixel_loss
from megatron_unihetero.models.projector import Projector
from megatron_unihetero.models.stage_plan import StagePlan
from megatron_unihetero.models.vae import PixelVAE, latent_token_dim, vision_grid
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
        self.plan = plan = StagePlan.build(config, pre_process, post_process)
        self.pre_process = pre_process
        self.post_process = post_process
        encoder_dim = load_hf_vision_config(config.vision).hidden_size
        llm_dim = config.llm.hidden_size
        self.tokens_per_image = tokens_per_image(config.vision)

        self.vision = _build_vision(config) if plan.vision else None
        self.projector = Projector(encoder_dim, llm_dim) if plan.projector else None
        if self.projector is not None and config.projector.frozen:
            self.projector.requires_grad_(False)
        self.target_projector = None
        if plan.target_projector is not None:
            self.target_projector = Projector(encoder_dim, llm_dim).requires_grad_(False)

        self.llm = LlamaDecoder(config.llm, transformer_config, pre_process=pre_process,
                                post_process=post_process, vp_stage=vp_stage)
        if config.freeze_llm:
            self.llm.requires_grad_(False)
        self.semantic_head = None
        if plan.semantic_head:
            target_dim = encoder_dim if config.semantic.target == "encoder_output" else llm_dim
            self.semantic_head = SemanticHead(llm_dim, target_dim, config.semantic.head)

        self.pixel_vae = self.pixel_head = None
        if plan.pixel_head:
            grid = vision_grid(self.tokens_per_image)
            if plan.pixel_vae:
                image_size = load_hf_vision_config(config.vision).image_size
                mean, std = image_normalization(config.vision)
                self.pixel_vae = PixelVAE(config.pixel, grid, image_size, mean, std)
            token_dim = latent_token_dim(config.pixel, self.pixel_vae)
            self.pixel_head = PixelHead(config.pixel, llm_dim, token_dim)

    # -- pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    # megatron-core's names for a tied LM head, read by its _allreduce_word_embedding_grads
    # (training/engine_megatron.py) on the model it finds under the DDP wrapper.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.cfg.llm.tie_word_embeddings

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    # -- checkpoint --------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """megatron-core's sharded state dict (checkpointing/dist.py): the decoder's layers
        TP-split with a global layer axis, everything else replicated; the copies this stage
        holds of another stage's state (``StagePlan.copies``: the last stage's encoder and
        projector mirror) are named as the original and marked as its replicas, so the
        checkpoint stores each tensor once and the copy loads from it at any pipeline size."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for local, original in self.plan.copies().items():
            for key, sharded in state.items():
                if key.startswith(prefix + local):
                    sharded.key = prefix + original + sharded.key[len(prefix + local):]
                    # replica_id = (pipeline copy, TP rank, DP rank): 0 is the main replica.
                    sharded.replica_id = (1, *sharded.replica_id[1:])
        return state

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
            if self.target_projector is not None:
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
                image_latents: Optional[torch.Tensor] = None, inference_context=None):
        """First/middle stages return hidden states [s, b, h]; the last stage returns
        :class:`ModelLosses` when labels are given, else hidden states.
        ``image_latents`` [n_img, T, C_lat]: precomputed pixel targets (pixel objective).
        ``inference_context``: megatron-core's KV cache for text generation
        (generation/text.py; one rank, no labels): ``tokens`` are this step's only, their
        images given with the prompt."""
        num_images = _num_images(images, image_features)
        if self.plan.is_middle:
            return self.llm(None, position_ids, segment_ids)
        layout = self._layout(tokens, segment_ids, num_images)
        features = visual = None
        if num_images and self.vision is not None:
            features = self.vision_features(images, image_features)

        decoder_input = None
        if self.pre_process:
            if self.training and self.cfg.pixel.cond_dropout > 0.0:
                tokens = drop_conditions(tokens, layout, self.cfg.pixel,  # guidance's null prompts
                                         starts_with_bos=self.cfg.documents_start_with_bos)
            embeddings = self.llm.embed(tokens)  # [s, b, h]
            if num_images:
                visual = self.projector(features)
                embeddings = interleaver.scatter_visual(
                    embeddings.transpose(0, 1), visual, layout).transpose(0, 1)
            decoder_input = embeddings

        hidden = self.llm(decoder_input, position_ids, segment_ids, inference_context=inference_context)
        if not self.post_process or labels is None:
            return hidden
        latents = None
        if self.pixel_head is not None and num_images:
            latents = self.pixel_latents(images, image_latents)
        # Input-embedding norms (diagnostics): only where this stage also embeds (PP = 1).
        embedded = decoder_input.transpose(0, 1) if self.pre_process else None
        return self.losses(hidden, labels, layout, features, visual, latents=latents,
                           embeddings=embedded)

    def pixel_latents(self, images: Optional[torch.Tensor],
                      image_latents: Optional[torch.Tensor]) -> torch.Tensor:
        """Latent tokens [n, T, C_lat]: precomputed in the batch, or VAE-encoded here."""
        if image_latents is not None:
            return image_latents
        if self.pixel_vae is None or images is None:
            raise ValueError(
                "the pixel objective needs latent targets: give the batch key 'image_latents' "
                "[n_img, T, C_lat], or raw 'images' with model.pixel.latent_source=vae")
        return self.pixel_vae.encode(images)

    def losses(self, hidden, labels, layout, features, visual,
               latents=None, embeddings=None) -> ModelLosses:
        """Each objective's (loss sum, token count) from the last stage's hidden [s, b, h],
        and the diagnostics' sufficient statistics (eval/diagnostics.py): computed without
        gradients, never part of the loss (:class:`ModelLosses`). ``embeddings`` [b, s, h]: the
        LLM's input embeddings, when this stage made them.
        """
        s, b, h = hidden.shape
        rows = hidden.reshape(s * b, h)  # [s, b] order: free for megatron's contiguous output

        # Text: every position, padding ignored through its label.
        text_labels = labels.masked_fill(layout.segment_ids < 0, IGNORE_INDEX).t().reshape(-1)
        out = {"text": text_loss(self.llm.output_layer, rows, text_labels,
                                 self.cfg.image_token_id, impl=self.cfg.llm.loss_impl)}
        stats: Dict[str, torch.Tensor] = {}
        if self.semantic_head is not None:
            sem_hidden = _rows_at(rows, layout.semantic_mask, b)
            if features is not None:
                targets = interleaver.semantic_targets(self.semantic_targets(features, visual), layout)
            else:
                targets = sem_hidden.new_zeros(0, self.semantic_head.proj.out_features)
            out["semantic"], stats["semantic"] = semantic_loss(
                self.semantic_head, sem_hidden, targets, self.cfg.semantic.loss,
                impl=self.cfg.semantic.loss_impl)
        if self.pixel_head is not None:
            cond = self.pixel_head.condition(hidden.transpose(0, 1), layout.semantic_mask,
                                             layout.segment_ids)
            if latents is not None:
                pixel_targets = interleaver.semantic_targets(latents.detach(), layout)
            else:
                pixel_targets = cond.new_zeros(0, self.pixel_head.token_dim)
            out["pixel"] = pixel_loss(self.pixel_head, cond, pixel_targets)
            schedule = self.pixel_head.noise_scheduler.alphas_cumprod
            stats["pixel"] = (diagnostics.pixel_stats(out["pixel"][0], pixel_targets, schedule,
                                                      self.cfg.pixel.prediction)
                              if pixel_targets.shape[0] else
                              diagnostics.empty_pixel_stats(self.pixel_head.token_dim,
                                                            schedule.numel(), rows.device))
        if embeddings is not None:
            valid = layout.segment_ids >= 0
            stats["embedding"] = diagnostics.embedding_stats(embeddings, layout.visual_mask, valid)
        return ModelLosses(objectives=out, stats=stats)


def _rows_at(rows: torch.Tensor, mask_bs: torch.Tensor, batch: int) -> torch.Tensor:
    """The rows of ``rows`` ([s * b, h] in [s, b] order) where ``mask_bs`` [b, s] is True,
    listed in [b, s] order (the interleaver's order of visual tokens and their targets)."""
    b_idx, s_idx = mask_bs.nonzero(as_tuple=True)
    return rows.index_select(0, s_idx * batch + b_idx)


def _num_images(images, image_features) -> int:
    if image_features is not None:
        return int(image_features.shape[0])
    if images is not None:
        return int(images.shape[0])
    return 0
