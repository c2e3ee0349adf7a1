"""Generate images from a checkpoint (tools/generate_image.py):

    python tools/generate_image.py --load CKPT --prompt "a red circle" [--prompt TEXT ...] \\
        --out FILE.png | DIR  [--cfg-scale S --guide both|semantic|pixel --steps N --seed K \\
        --temperature T --tokenizer PATH --no-cache --log FILE --verbose]

``--load``: the run's checkpoint dir (``latest``) or an iteration folder, loaded whole on this
one process (TP=PP=1; saved at any layout) as evaluate.py loads it. The model needs the
semantic head (``model.semantic.weight`` > 0) and the pixel head (``model.pixel.weight`` > 0)
with its VAE (``pixel.latent_source: vae``); ``--cfg-scale`` other than 1 needs
``model.pixel.cond_dropout`` > 0 (classifier-free guidance, generation/sample.py).
Each prompt is laid out as training lays out a caption before its image:
``BOS caption <image_start>`` (tokenizer: ``--tokenizer`` or the run's ``data.tokenizer``; no
BOS for a tokenizer without one, which a model guided here must have been trained for:
``model.documents_start_with_bos``).
One prompt: ``--out`` is a .png file (its folder must exist); several: ``--out`` is an
existing folder and prompt i is written to ``image_{i:03d}.png``. All prompts run as one
batch; prompt i draws from ``--seed`` + i (alone with that seed it gives the same image).

Bad input (a missing or damaged checkpoint, a model without a head it needs, an empty prompt,
an --out whose folder does not exist, ...) is one line on stderr and exit status 2. The
libraries' warnings go to ``--log`` (default: beside the output, ``generate_image.log``), not
to the console; ``--verbose`` prints them too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from megatron_unihetero import console

with console.held_warnings() as _import_warnings:
    from megatron_unihetero import evaluate, parallel
    from megatron_unihetero.checkpointing.errors import CheckpointError
    from megatron_unihetero.config_io import ConfigLoadError, load_config
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.generation import sample
    from megatron_unihetero.models.config import ConfigError
    from megatron_unihetero.training import checkpoint as ckpt
    from megatron_unihetero.training.config import RunConfig

LOG_NAME = "generate_image.log"
# Sampled latent tokens with a standard deviation above this are a diverged sampler, not an
# image: the VAE's latents are scaled to about unit variance (a converged head gives ~0.1-2).
DIVERGED_LATENT_STD = 50.0


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint dir (holds `latest`) or iteration folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="the caption of an image to generate (repeat for several)")
    p.add_argument("--out", required=True, help="a .png file (one prompt) or an existing folder")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 (default) off, 0 unconditional, > 1 guided")
    p.add_argument("--guide", default="both", choices=sample.GUIDES,
                   help="which prediction guidance mixes (default both)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps of the pixel head (default: model.pixel.num_sampling_steps)")
    p.add_argument("--seed", type=int, default=0, help="prompt i draws from seed + i")
    p.add_argument("--temperature", type=float, default=1.0, help="scales the pixel head's starting noise")
    p.add_argument("--tokenizer", help="tokenizer path (default: the run config's data.tokenizer)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--log", help=f"the libraries' warnings go here (default: {LOG_NAME} beside --out)")
    p.add_argument("--verbose", action="store_true", help="print the libraries' warnings too")
    return p


def output_paths(out: str, count: int) -> List[str]:
    """Where each image goes; refuses an --out that cannot take ``count`` images."""
    if os.path.isdir(out):
        return [os.path.join(out, f"image_{i:03d}.png") for i in range(count)]
    if count > 1:
        raise UsageError(f"--out {out!r}: {count} prompts need an existing folder (image_000.png, ...)")
    if not out.lower().endswith(".png"):
        raise UsageError(f"--out {out!r}: neither an existing folder nor a .png file")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out!r}: folder {folder!r} does not exist")
    return [out]


def check_config(run_config: RunConfig, iteration_dir: str, params: sample.ImageSampling) -> None:
    """What the model needs, from its config, before any weight is read."""
    model = run_config.model
    where = f"checkpoint {iteration_dir}"
    if not model.semantic.enabled:
        raise UsageError(f"{where} has no semantic head (image generation autoregresses its "
                         f"predictions): train with model.semantic.weight > 0")
    if not model.pixel.enabled:
        raise UsageError(f"{where} has no pixel head (it turns visual tokens into pixels): train "
                         f"with model.pixel.weight > 0")
    if model.pixel.latent_source != "vae":
        raise UsageError(f"{where} was trained on precomputed latents (model.pixel.latent_source="
                         f"batch): it has no VAE to decode with")
    if params.guided and model.pixel.cond_dropout == 0.0:
        raise UsageError(f"--cfg-scale {params.cfg_scale} needs a model trained with "
                         f"model.pixel.cond_dropout > 0; {where} was not (use --cfg-scale 1)")


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    held = list(_import_warnings)
    _import_warnings.clear()
    with console.RunLog(held) as log:
        try:
            return _generate(args, log)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            parallel.destroy()


def _generate(args, log) -> int:
    try:
        params = sample.ImageSampling(cfg_scale=args.cfg_scale, guide=args.guide,
                                      temperature=args.temperature, num_steps=args.steps,
                                      seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
    if empty:
        raise UsageError(f"--prompt number {empty[0] + 1} is empty: give the caption of the image")
    paths = output_paths(args.out, len(args.prompt))
    log_path = args.log or os.path.join(os.path.dirname(os.path.abspath(paths[0])), LOG_NAME)
    log.open(log_path, verbose=args.verbose)
    if not os.path.exists(args.load):
        raise UsageError(f"--load {args.load!r} does not exist")
    try:
        iteration_dir = evaluate.resolve_iteration_dir(args.load)
        ckpt.verify_checkpoint(iteration_dir, "sizes", require_manifest=False)
        run_config = load_config(RunConfig, os.path.join(iteration_dir, evaluate.ITERATION_CONFIG))
        check_config(run_config, iteration_dir, params)
        tokenizer_path = args.tokenizer or run_config.data.tokenizer
        if not tokenizer_path:
            raise UsageError("no tokenizer: pass --tokenizer (the run config has no data.tokenizer)")
        tokenizer = build_tokenizer(tokenizer_path)
        if tokenizer.image_token_id != run_config.model.image_token_id:
            raise UsageError(f"tokenizer {tokenizer_path!r} has <image> id {tokenizer.image_token_id}, "
                             f"the model was trained with model.image_token_id="
                             f"{run_config.model.image_token_id}")
        if params.guided and (tokenizer.bos_id is not None) != run_config.model.documents_start_with_bos:
            has = "a" if tokenizer.bos_id is not None else "no"
            raise UsageError(f"tokenizer {tokenizer_path!r} has {has} BOS but the model was "
                             f"trained with model.documents_start_with_bos="
                             f"{run_config.model.documents_start_with_bos}: guidance's null prompt "
                             f"would differ from training's")
        prompts = [sample.image_prompt(tokenizer, text) for text in args.prompt]
        _, model = evaluate.build_from_checkpoint(iteration_dir)
        start = time.perf_counter()
        vae = sample.model_vae(model)
        latents = sample.generate_latents(model, prompts, params, use_cache=not args.no_cache).latents
        images = sample.latents_to_images(vae, latents)
        seconds = time.perf_counter() - start
    except (FileNotFoundError, CheckpointError, ConfigLoadError, ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for i, std in enumerate(latents.float().std(dim=(1, 2)).tolist()):
        if not std < DIVERGED_LATENT_STD:  # NaN too
            print(f"warning: prompt {i + 1}'s latents have std {std:.3g} (the VAE's are scaled to "
                  f"about 1): the pixel head's sampler diverged and the image is noise. Typical of "
                  f"a short run with pixel.prediction=epsilon (its first DDIM step divides by "
                  f"sqrt(alpha-bar) ~ 5e-5); train longer, or with pixel.prediction=v",
                  file=sys.stderr)
    for path, image, text in zip(paths, images, args.prompt):
        image.save(path, format="PNG")
        print(f"wrote {path} ({image.size[0]}x{image.size[1]}): {text!r}")
    print(f"{len(images)} image(s) in {seconds:.2f} s ({model.tokens_per_image} visual tokens each, "
          f"{'KV cache' if not args.no_cache else 'full recompute'}, cfg scale {params.cfg_scale:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
