"""Image generation from prompts: autoregress the visual tokens, denoise their latents, decode.

    params = ImageSampling(cfg_scale=3.0, seed=1)
    prompts = [image_prompt(tokenizer, "a red circle"), image_prompt(tokenizer, "a blue cross")]
    images = sample_images(model, prompts, params)          # PIL images, one per prompt

A prompt is laid out as training lays out a caption before its image (data/preprocess/
samples.py: ``BOS caption <image_start>``, no BOS for a tokenizer without one, then the
image's T visual tokens). For each of the T visual positions in turn (one rank: TP=1, PP=1):
  1. the LLM runs on the prompt + the visual positions generated so far;
  2. at the last position the semantic head predicts the next visual INPUT embedding (through
     the projector when the semantic target is the encoder output), which becomes the next
     input embedding: the paper's autoregression on input embeddings (deterministic: a
     regression, nothing is drawn);
  3. the pixel head's reverse diffusion (DDIM), conditioned on the same position, gives that
     visual token's VAE latent patch (its starting noise is the only randomness).
The T latent patches are un-patchified to the VAE grid (models/vae.py) and decoded to pixels.

**The KV cache is megatron-core's** ``StaticInferenceContext``, as in text generation
(generation/text.py): the prompt is run once, then each step feeds one predicted embedding
(``LlamaDecoder.forward`` takes embeddings, the cache does not care what made them).
``use_cache=False`` recomputes the whole sequence at every step (the tests' reference). With
``routing: hetero`` the pixel head's small modality decoder (models/pixel.py, no cache of its
own) is re-run over the LLM hidden states kept so far at each step.

**Batches of prompts** of different lengths are LEFT-padded to the longest: a row's padding
is a segment of its own (-1) that no real position attends, and its position ids start at 0
at its first real token, so each row computes what it would alone (the cached path hides the
padding keys: models/llm.py ``_cached_inputs``). Prompt i of a batch draws its noise from a
generator seeded ``seed + i``: run alone with that seed, it gives the same image.

**Classifier-free guidance** (``cfg_scale``; the model must have been trained with
``model.pixel.cond_dropout`` > 0, which nulls captions to ``pixel.null_token_id``): each
prompt also runs as its *null prompt* (the caption's tokens replaced by the null token, BOS
(when ``model.documents_start_with_bos``) and ``<image_start>`` kept: what training's dropout
feeds, same length, same positions) in the same batch; the semantic prediction and/or the
pixel head's noise prediction (``guide``) is ``uncond + cfg_scale * (cond - uncond)``, and the
guided embedding is fed to both streams (the unconditional stream continues the same image, as
in LlamaGen / MAR). ``cfg_scale == 1``
(default) is off: the null stream is not run, the sampler is the unguided one exactly;
``cfg_scale == 0`` samples the unconditional model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_unihetero.generation import text

GUIDES = ("both", "semantic", "pixel")


@dataclass(frozen=True)
class ImageSampling:
    cfg_scale: float = 1.0  # 1: no guidance; 0: the unconditional model; > 1: guided
    guide: str = "both"  # which prediction guidance mixes: both | semantic | pixel
    temperature: float = 1.0  # scales the pixel head's starting noise
    num_steps: Optional[int] = None  # DDIM steps; None: model.pixel.num_sampling_steps
    seed: int = 0  # prompt i draws from seed + i

    def __post_init__(self):
        if not self.cfg_scale >= 0:  # NaN too: it would guide every pixel to NaN
            raise ValueError(f"cfg_scale must be >= 0 (1: off, 0: unconditional), got {self.cfg_scale}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}; got {self.guide!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


@dataclass
class ImageTokens:
    """Per prompt: the visual tokens' latents [n, T, C_lat] and the input embeddings fed at
    the visual positions [n, T, H] (guided ones when guiding), and the time it took."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    seconds: float = 0.0


def image_prompt(tokenizer, caption: str) -> List[int]:
    """``BOS caption <image_start>``: a text-to-image sample's ids before its image tokens
    (data/preprocess/samples.py encodes the text between specials as one plain string; no BOS
    for a tokenizer without one)."""
    if not caption.strip():
        raise ValueError("the prompt is empty: give the caption of the image to generate")
    return tokenizer.bos_ids + tokenizer.encode_plain(caption) + [tokenizer.image_start_id]


def null_prompt(prompt: Sequence[int], null_token_id: int, starts_with_bos: bool) -> List[int]:
    """The prompt as condition dropout trains it (models/pixel.py ``drop_conditions``): every
    token before the last (``<image_start>``) is the null token, but the first when it is BOS
    (``starts_with_bos``: model.documents_start_with_bos)."""
    kept = list(prompt[:1]) if starts_with_bos else []
    return kept + [null_token_id] * (len(prompt) - 1 - len(kept)) + [prompt[-1]]


def check_model(model, params: ImageSampling) -> None:
    """The model can generate images as asked; each refusal names the option to train with."""
    text.check_model(model, "image generation", "tools/generate_image.py")
    if model.semantic_head is None:
        raise ValueError("the model has no semantic head (image generation feeds its predictions "
                         "back as the next input embeddings): train with model.semantic.weight > 0")
    if model.pixel_head is None:
        raise ValueError("the model has no pixel head (it turns each visual token into pixels): "
                         "train with model.pixel.weight > 0")
    levels = model.cfg.pixel.num_diffusion_steps
    if params.num_steps is not None and params.num_steps > levels:
        raise ValueError(f"num_steps {params.num_steps} is more than the {levels} noise levels the "
                         f"pixel head was trained on (model.pixel.num_diffusion_steps)")
    if params.guided and model.cfg.pixel.cond_dropout == 0.0:
        raise ValueError(f"cfg_scale {params.cfg_scale} needs a model trained with "
                         f"model.pixel.cond_dropout > 0 (it learns the null prompt): this one was "
                         f"not; use cfg_scale 1 (no guidance)")


@torch.no_grad()
def generate_latents(model, prompts: Sequence[Sequence[int]], params: ImageSampling = ImageSampling(),
                     *, use_cache: bool = True) -> ImageTokens:
    """Generate one image's visual tokens after each prompt (ids ending with ``<image_start>``,
    :func:`image_prompt`); see the module docstring for the batch, the cache and guidance."""
    from megatron.core.inference.contexts import StaticInferenceContext

    check_model(model, params)
    if not prompts or any(len(p) < 2 for p in prompts):
        raise ValueError("each prompt needs a caption token (or BOS) and <image_start>")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = model.tokens_per_image
    n = len(prompts)
    streams = [list(p) for p in prompts]
    if params.guided:
        streams += [null_prompt(p, model.cfg.pixel.null_token_id, model.cfg.documents_start_with_bos)
                    for p in prompts]
    rows, longest = len(streams), max(len(p) for p in streams)
    total = longest + count - 1  # the last visual token is predicted, never fed
    limit = model.cfg.llm.max_sequence_length
    if total > limit:
        raise ValueError(f"the longest prompt is {longest} tokens; with the image's {count} tokens "
                         f"that is more than model.llm.max_sequence_length={limit}")
    pads = torch.tensor([longest - len(p) for p in streams], device=device)[:, None]
    tokens = torch.tensor([[p[0]] * (longest - len(p)) + p for p in streams], device=device)
    positions = (torch.arange(total, device=device)[None] - pads).clamp(min=0)  # [rows, total]
    # Left padding as a segment of its own (-1); None when no row is padded (plain causal).
    segments = torch.where(torch.arange(total, device=device)[None] < pads, -1, 0).to(torch.int32)
    padded = bool(pads.any())

    def llm_segments(end: int) -> Optional[torch.Tensor]:
        return segments[:, :end] if padded else None  # None: plain causal attention

    embeddings = model.llm.embed(tokens)  # [longest, rows, h]
    embeddings = torch.cat([embeddings, embeddings.new_zeros(count - 1, rows, embeddings.shape[-1])])
    generators = [torch.Generator(device=device).manual_seed(params.seed + i) for i in range(n)]
    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=total) if use_cache else None
    history: List[torch.Tensor] = []
    latents, fed = [], []
    start = time.perf_counter()
    try:
        for k in range(count):
            end = longest + k
            if context is None:  # the whole sequence again: the reference for the cache
                states = model.llm(embeddings[:end], positions[:, :end], llm_segments(end))
            else:
                offset = context.sequence_len_offset
                history.append(model.llm(embeddings[offset:end], positions[:, offset:end],
                                         llm_segments(end), inference_context=context))
                context.increment_sequence_len_offset(end - offset)
                context.enable_decode_mode()
                states = torch.cat(history)
            prediction, cond = _heads(model, states, segments[:, :end])
            if params.guided:
                pred_c, pred_u = prediction.chunk(2)
                if params.guide in ("both", "semantic"):
                    pred_c = pred_u + params.cfg_scale * (pred_c - pred_u)
                prediction = torch.cat([pred_c, pred_c])  # both streams continue one image
            noise = torch.stack([torch.randn(model.pixel_head.token_dim, generator=g, device=device)
                                 for g in generators])
            if params.guided and params.guide in ("both", "pixel"):
                latent = model.pixel_head.sample(cond[:n], params.num_steps, params.temperature, noise=noise,
                                                 uncond=cond[n:], cfg_scale=params.cfg_scale)
            else:
                latent = model.pixel_head.sample(cond[:n], params.num_steps, params.temperature, noise=noise)
            latents.append(latent)
            fed.append(prediction[:n])
            if k + 1 < count:
                embeddings[end] = prediction.to(embeddings.dtype)
    finally:
        model.train(was_training)
    return ImageTokens(latents=torch.stack(latents, dim=1), embeddings=torch.stack(fed, dim=1),
                       seconds=time.perf_counter() - start)


def _heads(model, states: torch.Tensor, segments: torch.Tensor):
    """(the semantic head's next input embedding [rows, H], the pixel head's condition
    [rows, H]) at the last position of the LLM hidden states ``states`` [s, rows, h]."""
    last = states[-1]
    prediction = model.semantic_head(last)
    if model.cfg.semantic.target == "encoder_output":
        prediction = model.projector(prediction)
    if model.cfg.pixel.routing == "shared":
        return prediction, last
    # hetero: the modality decoder over every hidden state so far (its padding rows, -1, are
    # attended by nothing), read at the last position.
    cond = model.pixel_head.decoder(states.transpose(0, 1), segments)[:, -1]
    return prediction, cond


@torch.no_grad()
def latents_to_images(vae, latent_tokens: torch.Tensor) -> list:
    """Latent tokens [n, T, C_lat] -> n PIL RGB images at the VAE's resolution."""
    from PIL import Image

    pixels = vae.decode(latent_tokens.float())  # [n, 3, S, S] in [0, 1]
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(array, mode="RGB") for array in arrays]


def model_vae(model, vae=None):
    """The VAE to decode with: ``vae``, else the model's own (``pixel.latent_source: vae``)."""
    vae = vae if vae is not None else model.pixel_vae
    if vae is None:
        raise ValueError("no VAE to decode with: the model was trained on precomputed latents "
                         "(model.pixel.latent_source=batch); pass the PixelVAE that produced them")
    return vae


def sample_images(model, prompts: Sequence[Sequence[int]], params: ImageSampling = ImageSampling(),
                  *, vae=None, use_cache: bool = True) -> list:
    """One PIL image per prompt (:func:`generate_latents`, then the VAE's decoder).

    ``vae``: a :class:`~megatron_unihetero.models.vae.PixelVAE`; defaults to the model's own
    (present with ``pixel.latent_source: vae``; with precomputed latents pass the VAE that made
    them).
    """
    vae = model_vae(model, vae)
    tokens = generate_latents(model, prompts, params, use_cache=use_cache)
    return latents_to_images(vae, tokens.latents)
