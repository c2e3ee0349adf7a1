"""Tokenizers with the image special tokens: SentencePiece .model files or local HF folders.

``build_tokenizer(path)`` accepts
  * a SentencePiece ``.model`` file: either one trained by tools/train_tokenizer.py (the special
    tokens are user_defined_symbols inside it) or an existing model without them (e.g. the
    Llama-2 tokenizer), in which case the missing specials get ids appended after the base
    vocabulary and :meth:`SentencePieceTokenizer.encode` splits the text on the special
    strings so they are never broken into pieces;
  * a local folder holding a HF tokenizer (``AutoTokenizer.from_pretrained(folder)``; never a
    hub id, never trust_remote_code); missing specials are added as special tokens;
  * a folder written by :meth:`Tokenizer.save` (``tokenizer_meta.json`` says which kind).

Every tokenizer exposes the same interface: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``,
``image_token_id``, ``image_start_id``, ``image_end_id``, ``encode_plain`` and ``encode`` (no
BOS/EOS added), ``decode``, ``save(folder)`` and ``metadata()`` (stored in every shard's json).

BOS: ``bos_id`` is None for a tokenizer without one (Qwen2's ``bos_token: null``, GPT-2's):
its model never saw a BOS, so a document is just its tokens. Whatever writes a document start
writes ``bos_ids`` (``[bos_id]`` or ``[]``), never EOS in BOS's place.

Two encodings, because text comes from two places:
  * ``encode_plain(text)``: text from a data set (captions, questions, answers, conversation
    turns). Special strings written in it (``<image>``, ``<pad>``, ``<s>``, ...) are plain
    text: a caption that mentions ``<image>`` must not become a second image placeholder, and
    ``<pad>`` must not become the pad id and be trained as a target. Preprocessing encodes with
    this only; the placeholders of the sample's real images are added by id (samples.py).
  * ``encode(text)``: text we rendered ourselves (a chat template's output): the special
    strings are the special tokens, as the exported HF tokenizer reads them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence

import sentencepiece as spm

# transformers is imported in HFTokenizer only: the preprocessing workers import this module,
# and a SentencePiece tokenizer does not need it.

IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<image_start>"
IMAGE_END_TOKEN = "<image_end>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, PAD_TOKEN)
META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """Common interface; subclasses set the ids and implement encode/decode/save."""

    kind: str
    path: str
    vocab_size: int
    bos_id: Optional[int]  # None: the tokenizer has no BOS (module docstring)
    eos_id: int
    pad_id: int
    image_token_id: int
    image_start_id: int
    image_end_id: int

    @property
    def bos_ids(self) -> List[int]:
        """What starts a document: ``[bos_id]``, or nothing for a tokenizer without BOS."""
        return [] if self.bos_id is None else [self.bos_id]

    def encode_plain(self, text: str) -> List[int]:
        """Data set text: special strings in it are plain text (module docstring)."""
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        """Text we rendered: special strings in it are the special tokens."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, folder: str) -> None:
        raise NotImplementedError

    def metadata(self) -> Dict[str, Any]:
        """What a shard records about the tokenizer that produced it."""
        return {
            "kind": self.kind,
            "path": os.path.abspath(self.path),
            "vocab_size": self.vocab_size,
            **{k: getattr(self, k) for k in ("bos_id", "eos_id", "pad_id", "image_token_id", "image_start_id", "image_end_id")},
        }

    def _write_meta(self, folder: str, **extra: Any) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump({**self.metadata(), **extra}, f, indent=1, sort_keys=True)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: str) -> None:
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        base = self.sp.get_piece_size()
        self.base_vocab_size = base
        # Specials already in the model (trained in as user_defined_symbols) keep their id;
        # missing ones are appended after the base vocabulary, in SPECIAL_TOKENS order.
        self.special_ids: Dict[str, int] = {}
        self.appended: List[str] = []
        for tok in SPECIAL_TOKENS:
            pid = self.sp.piece_to_id(tok)
            if pid == self.sp.unk_id() and tok != self.sp.id_to_piece(self.sp.unk_id()):
                pid = base + len(self.appended)
                self.appended.append(tok)
            self.special_ids[tok] = pid
        self.id_to_special = {v: k for k, v in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.sp_plain = _without_user_defined(self.sp, [t for t in SPECIAL_TOKENS if t not in self.appended])
        self.vocab_size = base + len(self.appended)
        if self.sp.eos_id() < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no EOS piece (eos_id={self.sp.eos_id()})")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # trained with bos_id=-1
        # A model trained with pad_id keeps its own pad; otherwise "<pad>" is ours.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.special_ids[PAD_TOKEN]
        self.image_token_id = self.special_ids[IMAGE_TOKEN]
        self.image_start_id = self.special_ids[IMAGE_START_TOKEN]
        self.image_end_id = self.special_ids[IMAGE_END_TOKEN]

    def encode_plain(self, text: str) -> List[int]:
        # Appended specials are unknown to the model: it spells them out. Trained-in ones are
        # user-defined symbols, which SentencePiece matches anywhere in its input; sp_plain is
        # the same model with them marked unused, so it spells them out too.
        return self.sp_plain.encode(text)

    def encode(self, text: str) -> List[int]:
        # Split on the specials ourselves: SentencePiece would cut an appended "<image>" into
        # pieces, and splitting also makes trained-in and appended specials behave the same.
        ids: List[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in self.id_to_special:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(self.path, os.path.join(folder, "tokenizer.model"))
        self._write_meta(folder, model_file="tokenizer.model", base_vocab_size=self.base_vocab_size, appended_specials=self.appended)

    def metadata(self) -> Dict[str, Any]:
        return {**super().metadata(), "base_vocab_size": self.base_vocab_size, "appended_specials": list(self.appended)}


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, folder: str) -> None:
        from transformers import AutoTokenizer

        self.path = folder
        # Local folder only: a hub id would need the network, remote code is never run.
        self.tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        missing = [t for t in SPECIAL_TOKENS[:3] if t not in self.tok.get_vocab()]
        if missing:
            self.tok.add_tokens(missing, special_tokens=True)
        if self.tok.pad_token is None:
            self.tok.add_special_tokens({"pad_token": PAD_TOKEN})
        if self.tok.eos_token_id is None:
            raise ValueError(f"{folder}: the HF tokenizer has no eos_token; set one in its tokenizer_config.json")
        self.eos_id = int(self.tok.eos_token_id)
        # Without BOS (Qwen2, GPT-2) documents start with their first token, as those models'
        # own pretraining did: EOS in BOS's place would be an id never seen at a start.
        self.bos_id = None if self.tok.bos_token_id is None else int(self.tok.bos_token_id)
        self.pad_id = int(self.tok.pad_token_id)
        ids = self.tok.convert_tokens_to_ids(list(SPECIAL_TOKENS[:3]))
        self.image_token_id, self.image_start_id, self.image_end_id = (int(i) for i in ids)
        self.vocab_size = len(self.tok)

    def encode_plain(self, text: str) -> List[int]:
        # split_special_tokens: every special token's string (added ones and the model's own
        # <s>, </s>, ...) is tokenized as the plain text it is.
        return list(self.tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, folder: str) -> None:
        self.tok.save_pretrained(folder)
        self._write_meta(folder)


def _without_user_defined(sp: "spm.SentencePieceProcessor", pieces: Sequence[str]) -> "spm.SentencePieceProcessor":
    """``sp`` with ``pieces`` (user-defined symbols) marked UNUSED: SentencePiece never produces an
    unused piece, so the model spells those strings out of ordinary pieces (or bytes) instead.
    The ids of every other piece are unchanged."""
    if not pieces:
        return sp
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    for piece in proto.pieces:
        if piece.piece in pieces and piece.type == kinds.USER_DEFINED:
            piece.type = kinds.UNUSED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def build_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a SentencePiece .model file or a local folder (see module docstring)."""
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    if os.path.isdir(path):
        meta_path = os.path.join(path, META_FILE)
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("kind") == "sentencepiece":
                return SentencePieceTokenizer(os.path.join(path, meta.get("model_file", "tokenizer.model")))
        if os.path.exists(os.path.join(path, "tokenizer.model")) and not os.path.exists(os.path.join(path, "tokenizer_config.json")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        return HFTokenizer(path)
    raise FileNotFoundError(
        f"tokenizer {path!r} not found: pass a SentencePiece .model file or a local HF tokenizer folder "
        "(hub ids are not downloaded)"
    )
