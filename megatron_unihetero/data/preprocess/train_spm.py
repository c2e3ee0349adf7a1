"""Train a SentencePiece model with the image special tokens built in (tools/train_tokenizer.py)."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Sequence

import sentencepiece as spm

from megatron_unihetero.data.preprocess.readers import iter_texts
from megatron_unihetero.data.tokenizer import PAD_TOKEN, SPECIAL_TOKENS


def train_sentencepiece(inputs: Sequence[str], output: str, vocab_size: int, text_columns: Sequence[str],
                        model_type: str = "bpe", max_sentences: int = 2_000_000) -> Dict[str, Any]:
    """Train ``output`` (a PATH.model) on the text columns of ``inputs``.

    Byte fallback is on, so any text (other scripts, emoji) encodes without <unk>. The special
    tokens are user_defined_symbols, so they get fixed ids right after unk/bos/eos and are never
    split. ``hard_vocab_limit=False`` lets tiny corpora (the demo world has ~60 words) train
    with a vocabulary smaller than asked rather than fail.
    """
    if not output.endswith(".model"):
        raise ValueError(f"--output must end in .model, got {output}")
    count = [0]

    def sentences() -> Iterator[str]:
        for text in iter_texts(inputs, text_columns):
            if count[0] >= max_sentences:
                return
            count[0] += 1
            yield text

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    user_symbols = [t for t in SPECIAL_TOKENS if t != PAD_TOKEN]
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=output[: -len(".model")],
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=user_symbols,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece=PAD_TOKEN,
        hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    if count[0] == 0:
        raise ValueError(f"no text found in columns {list(text_columns)} of {list(inputs)}")
    sp = spm.SentencePieceProcessor(model_file=output)
    return {"vocab_size": sp.get_piece_size(), "num_sentences": count[0]}
