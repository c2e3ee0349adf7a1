"""The pieces of the init-from-HuggingFace rehearsal, at any width (benchmarks/rehearsal_7b.py
runs them at Llama-2-7B + DINOv2-L width; tests/hf/test_hf_init_path.py at a tiny one).

* :func:`train_plain_sentencepiece`: a SentencePiece model *without* our special tokens (unk,
  BOS, EOS at 0-2, no pad, byte fallback), as Llama-2's is: the import must append <image>, ...
  and grow the embeddings;
* :func:`save_llama_folder` / :func:`save_dinov2_folder`: randomly initialised HF folders
  (transformers' own classes, ``save_pretrained``), the Llama one holding that tokenizer.model;
* :func:`logits_parity`: one sample through the exported folder's processor and
  LlavaForConditionalGeneration, and through our model loaded from the checkpoint; the largest
  absolute logit difference.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Sequence

import torch

from megatron_unihetero.data.preprocess.readers import iter_texts


def train_plain_sentencepiece(inputs: Sequence[str], output: str, vocab_size: int,
                              text_columns: Sequence[str] = ("caption", "question", "answer")) -> str:
    """``output`` (PATH.model) trained on the text of ``inputs``, with no special tokens of ours."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_texts(list(inputs), list(text_columns)),
        model_prefix=output[: -len(".model")], vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
    return output


def save_llama_folder(folder: str, tokenizer_model: str, *, hidden_size: int, num_heads: int,
                      ffn_hidden_size: int, num_layers: int, max_positions: int = 4096,
                      seed: int = 0) -> str:
    """A random untied LlamaForCausalLM (no GQA) whose vocabulary is the tokenizer's pieces."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    pieces = spm.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()
    config = LlamaConfig(vocab_size=pieces, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copyfile(tokenizer_model, os.path.join(folder, "tokenizer.model"))
    return folder


def save_dinov2_folder(folder: str, *, hidden_size: int, num_layers: int, num_heads: int,
                       image_size: int, patch_size: int, seed: int = 0) -> str:
    """A random Dinov2Model (MLP 4 x wide, as DINOv2-L) at its release resolution."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                             image_size=image_size, patch_size=patch_size)).eval().save_pretrained(folder)
    return folder


def logits_parity(iter_dir: str, hf_dir: str, image, text: str) -> Dict[str, float]:
    """Feed BOS + ``<image>`` + ``text`` with ``image`` (PIL) through ``hf_dir``'s processor (a
    prompt written by hand brings its own BOS, if the tokenizer has one: it adds none); return
    ``{max_abs_diff, max_abs_logit, num_image_tokens, seq_len}`` between its
    LlavaForConditionalGeneration's logits and our model's (checkpoint ``iter_dir``, TP=1, fp32)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from megatron_unihetero import config_io, parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.hf.export import read_run_config
    from megatron_unihetero.models.config import ModelConfig

    processor = AutoProcessor.from_pretrained(hf_dir)
    bos = processor.tokenizer.bos_token or ""  # none for a tokenizer without BOS (Qwen2's)
    inputs = processor(text=bos + "<image>" + text, images=image, return_tensors="pt")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(**inputs).logits[0]
    del hf
    model_config = config_io.from_dict(ModelConfig, read_run_config(iter_dir)["model"], "model")
    tokens = inputs["input_ids"]
    with parallel.single_process():
        ours_model = parallel.build_model(model_config)
        dist_ckpt.load_model([ours_model], dist_ckpt.dist_dir(iter_dir))
        ours_model.eval()
        seq = tokens.shape[1]
        with torch.no_grad():
            hidden = ours_model(tokens, torch.arange(seq)[None],
                                segment_ids=torch.zeros(1, seq, dtype=torch.int32),
                                images=inputs["pixel_values"])
            ours, _ = ours_model.llm.output_layer(hidden)
    ours = ours.transpose(0, 1)[0]
    return {"max_abs_diff": float((ours - theirs).abs().max()), "max_abs_logit": float(ours.abs().max()),
            "num_image_tokens": int((tokens == model_config.image_token_id).sum()), "seq_len": int(seq)}
