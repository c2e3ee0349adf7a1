"""Evaluate a checkpoint on held-out data: understanding, probes, semantic retrieval.

    python -m megatron_unihetero.evaluate --load CKPT --data DIR [--tokenizer PATH] \\
        [--max-samples N] [--output metrics.json] \\
        [--generate [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]]

``--load`` is a checkpoint folder: either the run's checkpoint dir (``CKPT/latest`` names the
iteration folder) or an iteration folder itself. The iteration folder holds the run's
``config.yaml`` (a RunConfig) and the model weights in ``dist/`` (checkpointing/dist.py).
``--data`` is the demo data folder (its ``valid.parquet`` is read), a parquet file, or a
multiple-choice TSV in VLMEvalKit's layout (eval/data.py ``read_vlmeval_tsv``).
Runs on one process (TP=1, PP=1); a checkpoint saved at any TP/PP is merged on load.

The libraries' warnings (megatron-core's "TransformerEngine / apex not installed", ...) go to
``--log`` (default: beside ``--output``), not to the console; ``--verbose`` prints them too.

Metrics (megatron_unihetero/eval): answer accuracy over each question's candidates, caption
perplexity, linear-probe test accuracy of the mean visual hidden state for each first-object
attribute, and top-1 / top-5 retrieval of the true next visual embedding with the R² and cosine
of the predictions against the mean predictor's (semantic head only; eval/diagnostics.py).

``--generate`` adds figures of generated text under ``"generation"`` (generation/text.py:
greedy by default, ``--temperature`` > 0 samples; megatron-core's KV cache): exact match, VQA
accuracy and ANLS of the answers to the questions, BLEU-1..4 and CIDEr-D of captions generated
from the caption prompt (demo parquet), and for a VLMEvalKit TSV the accuracy of the option the
generated answer names (its letter or its text) with the share that named none
(eval/generation_metrics.py); also tokens/s and a few examples. The other figures do not change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional

from megatron_unihetero import console

# The libraries' import-time warnings are held for the log (main), not printed.
with console.held_warnings() as _import_warnings:
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.checkpointing.errors import CheckpointError
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.eval import runners
    from megatron_unihetero.eval.data import build_eval_sets, build_generation_sets, held_out_path, read_rows
    from megatron_unihetero.generation.text import SamplingParams
    from megatron_unihetero.models.vision import image_normalization, load_hf_vision_config
    from megatron_unihetero.training import checkpoint as ckpt
    from megatron_unihetero.training.config import RunConfig

ITERATION_CONFIG = "config.yaml"


def resolve_iteration_dir(load: str) -> str:
    """CKPT/latest -> CKPT/<iteration> (training/checkpoint.py), or ``load`` itself when it is
    an iteration folder (holds config.yaml)."""
    latest = ckpt.latest_iteration_dir(load)
    if latest is not None:
        return latest
    if os.path.isfile(os.path.join(load, ITERATION_CONFIG)):
        return load
    raise FileNotFoundError(f"--load {load!r}: neither a checkpoint dir with a 'latest' file nor "
                            f"an iteration folder with {ITERATION_CONFIG}")


def build_from_checkpoint(iteration_dir: str):
    """(RunConfig, model) with the checkpoint's weights, on this single process."""
    run_config = load_config(RunConfig, os.path.join(iteration_dir, ITERATION_CONFIG))
    parallel.initialize(1, 1, seed=run_config.train.seed)
    model = parallel.build_model(run_config.model)
    dist_ckpt.load_model([model], dist_ckpt.dist_dir(iteration_dir))
    model.eval()
    return run_config, model


def evaluate_model(model, sets, *, min_probe_samples: int = 10) -> Dict[str, object]:
    """Every metric that applies to this model and data.

    Held-out data without captions (a multiple-choice TSV) has no caption perplexity and no
    probes; its retrieval and R² run on the questions' image + prompt + right answer.
    """
    results: Dict[str, object] = {"num_samples": len(sets.questions)}
    # The scoring the training run's own evaluation uses (eval/scoring.py): the same figures.
    accuracy = runners.answer_accuracy(model, sets.questions)
    results["answer_accuracy"] = accuracy["accuracy"]
    results["chance_accuracy"] = accuracy["chance_accuracy"]
    results["answer_logprob"] = accuracy["answer_logprob"]
    if sets.captions:
        results.update({f"caption_{k}": v for k, v in runners.caption_perplexity(model, sets.captions).items()})
    if sets.attributes and len(sets.captions) >= min_probe_samples:
        probes = runners.attribute_probes(model, sets.captions, sets.attributes)
        results["probes"] = probes
    if model.semantic_head is not None:
        with_images = sets.captions or [q.candidates[q.answer] for q in sets.questions]
        results["semantic_retrieval"] = runners.semantic_retrieval(model, with_images)
    return results


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint dir or iteration folder")
    parser.add_argument("--data", required=True,
                        help="demo data folder (valid.parquet), a parquet file, or a VLMEvalKit "
                             "multiple-choice TSV (.tsv)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: the run config's data.tokenizer)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--output", help="write the metrics here as JSON")
    parser.add_argument("--log", help="the libraries' warnings and this package's log lines go here "
                                      "(default: beside --output, OUTPUT.log; without --output "
                                      "they are not kept)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the libraries' warnings on the console too")
    gen = parser.add_argument_group("generation (--generate)")
    gen.add_argument("--generate", action="store_true",
                     help="also generate answers and captions and score them (exact match, VQA "
                          "accuracy, ANLS, BLEU, CIDEr; multiple-choice accuracy on a TSV)")
    gen.add_argument("--max-new-tokens", type=int, default=24)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 (default): off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 (default): off")
    gen.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    args = parser.parse_args(argv)
    try:
        args.sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    held = list(_import_warnings)
    _import_warnings.clear()
    with console.RunLog(held) as log:
        log_path = args.log or (os.path.splitext(args.output)[0] + ".log" if args.output else None)
        if log_path:
            log.open(log_path, verbose=args.verbose)
        elif args.verbose:
            log.open(os.devnull, verbose=True)
        return _evaluate(parser, args)


def _evaluate(parser: argparse.ArgumentParser, args) -> int:
    iteration_dir = resolve_iteration_dir(args.load)
    try:
        ckpt.verify_checkpoint(iteration_dir, "sizes", require_manifest=False)
    except CheckpointError as exc:  # names the damaged file: a usage error, not a traceback
        parser.error(str(exc))
    try:
        run_config, model = build_from_checkpoint(iteration_dir)
    except CheckpointError as exc:  # a file that does not load (or is refused): named, no traceback
        parser.error(str(exc))
    tokenizer_path = args.tokenizer or run_config.data.tokenizer
    if not tokenizer_path:
        parser.error("no tokenizer: pass --tokenizer (the run config has no data.tokenizer)")
    tokenizer = build_tokenizer(tokenizer_path)
    if tokenizer.image_token_id != run_config.model.image_token_id:
        parser.error(f"tokenizer {tokenizer_path!r} has <image> id {tokenizer.image_token_id}, "
                     f"the model was trained with model.image_token_id="
                     f"{run_config.model.image_token_id}")
    data_path = held_out_path(args.data)
    try:
        rows = read_rows(data_path, args.max_samples)
    except ValueError as exc:  # a malformed TSV row: the message names the file, row and field
        parser.error(str(exc))
    mean, std = image_normalization(run_config.model.vision)
    sets = build_eval_sets(rows, tokenizer, tokens_per_image=model.tokens_per_image,
                           image_size=load_hf_vision_config(run_config.model.vision).image_size,
                           image_mean=mean, image_std=std)
    results = {"checkpoint": os.path.abspath(iteration_dir), "data": os.path.abspath(data_path),
               **evaluate_model(model, sets)}
    if args.generate:
        prompts = build_generation_sets(rows, tokenizer, tokens_per_image=model.tokens_per_image,
                                        image_size=load_hf_vision_config(run_config.model.vision).image_size,
                                        image_mean=mean, image_std=std)
        results["generation"] = runners.generative_figures(model, prompts, tokenizer, args.sampling)
    text = json.dumps(results, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
