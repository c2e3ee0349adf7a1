"""Image generation from a prompt: autoregress the visual tokens, denoise their latents, decode.

For each of the image's T visual positions in turn (single rank: TP=1, PP=1):
  1. run the LLM on ``prompt + the visual positions generated so far``;
  2. at the last position, the semantic head predicts the next visual INPUT embedding (through
     the projector when the semantic target is the encoder output), which becomes the next
     input embedding: the paper's autoregression on input embeddings;
  3. the pixel head's reverse diffusion (DDIM), conditioned on the same position, gives that
     visual token's VAE latent patch.
The T latent patches are un-patchified to the VAE grid (models/vae.py) and decoded to pixels.

Cost: T full forwards over the growing sequence (no KV cache): fine for the small models this
codebase trains on CPU and for spot checks of large ones; a cached decoder is future work.
The sequence is kept at its final length from the start and positions past the current one are
never read, so causal attention makes this equal to growing it one token at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def _check_model(model) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError("sampling needs the whole model on one rank (TP=1, PP=1)")
    if model.semantic_head is None:
        raise ValueError("sampling feeds the semantic head's predictions back as the next input "
                         "embeddings: enable model.semantic (weight > 0)")
    if model.pixel_head is None:
        raise ValueError("sampling needs the pixel head: enable model.pixel (weight > 0)")


@torch.no_grad()
def generate_latents(model, prompt_ids: Sequence[int], *, temperature: float = 1.0,
                     num_steps: Optional[int] = None,
                     seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate one image's visual tokens after ``prompt_ids``.

    Returns (latent tokens [T, C_lat], predicted input embeddings [T, H]). The prompt usually
    ends with ``<image_start>`` (the training layout puts it right before the image).
    """
    _check_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    count = model.tokens_per_image
    start = len(prompt_ids)
    tokens = torch.tensor(list(prompt_ids) + [model.cfg.image_token_id] * count,
                          dtype=torch.long, device=device)[None]
    position_ids = torch.arange(tokens.shape[1], device=device)[None]
    segment_ids = torch.zeros_like(tokens, dtype=torch.int32)
    embeddings = model.llm.embed(tokens)  # [s, 1, h]
    generated, latents = [], []
    for k in range(count):
        hidden = model.llm(embeddings, position_ids, None)  # [s, 1, h]
        hidden_bsh = hidden.transpose(0, 1)
        where = torch.zeros_like(tokens, dtype=torch.bool)
        where[0, start + k - 1] = True  # position i predicts the visual token at i + 1
        prediction = model.semantic_head(hidden_bsh[where])  # [1, D]
        if model.cfg.semantic.target == "encoder_output":
            prediction = model.projector(prediction)
        cond = model.pixel_head.condition(hidden_bsh, where, segment_ids)
        latents.append(model.pixel_head.sample(cond, num_steps=num_steps, temperature=temperature,
                                               generator=generator)[0])
        generated.append(prediction[0])
        embeddings = embeddings.clone()
        embeddings[start + k, 0] = prediction[0].to(embeddings.dtype)
    model.train(was_training)
    return torch.stack(latents), torch.stack(generated)


@torch.no_grad()
def latents_to_image(vae, latent_tokens: torch.Tensor):
    """Latent tokens [T, C_lat] -> a PIL RGB image at the VAE's resolution."""
    from PIL import Image

    pixels = vae.decode(latent_tokens[None].float())[0]  # [3, S, S] in [0, 1]
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255.0).round().clip(0, 255).astype("uint8")
    return Image.fromarray(array, mode="RGB")


def sample_image(model, prompt_ids: Sequence[int], output_path: str, *, vae=None,
                 temperature: float = 1.0, num_steps: Optional[int] = None, seed: int = 0):
    """Generate an image for ``prompt_ids`` and write it as a PNG; returns the PIL image.

    ``vae``: a :class:`~megatron_unihetero.models.vae.PixelVAE`; defaults to the model's own
    (present with ``pixel.latent_source: vae``; with precomputed latents pass the VAE that made
    them).
    """
    vae = vae if vae is not None else model.pixel_vae
    if vae is None:
        raise ValueError("no VAE to decode with: the model was trained on precomputed latents; "
                         "pass vae=PixelVAE(...) built from the VAE that produced them")
    latents, _ = generate_latents(model, prompt_ids, temperature=temperature,
                                  num_steps=num_steps, seed=seed)
    image = latents_to_image(vae, latents)
    image.save(output_path, format="PNG")
    return image
