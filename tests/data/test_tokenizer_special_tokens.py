"""Tokenizers: special tokens for images and padding, for every supported kind."""

import pytest

from megatron_unihetero.data import tokenizer as T
from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

TEXT = "a large red circle at the top left"


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _check_common(tok):
    ids = {tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id, tok.image_start_id, tok.image_end_id}
    assert len(ids) == 6, "special ids must be distinct"
    assert all(0 <= i < tok.vocab_size for i in ids)
    text = f"{T.IMAGE_START_TOKEN}{T.IMAGE_TOKEN}{T.IMAGE_END_TOKEN} {TEXT}"
    enc = tok.encode(text)
    assert enc[:3] == [tok.image_start_id, tok.image_token_id, tok.image_end_id]
    assert enc.count(tok.image_token_id) == 1
    assert tok.image_token_id not in tok.encode(TEXT)
    assert TEXT in tok.decode(enc) and tok.decode(enc).startswith(T.IMAGE_START_TOKEN) and T.IMAGE_TOKEN in tok.decode(enc)
    meta = tok.metadata()
    for k in ("kind", "vocab_size", "bos_id", "eos_id", "pad_id", "image_token_id", "image_start_id", "image_end_id"):
        assert k in meta


def test_trained_sentencepiece_has_specials_built_in(spm_path):
    tok = T.build_tokenizer(spm_path)
    _check_common(tok)
    assert tok.appended == [] and tok.vocab_size == tok.base_vocab_size
    assert tok.sp.id_to_piece(tok.image_token_id) == T.IMAGE_TOKEN
    emoji = "naïve 😀 ünïcödé"
    assert tok.decode(tok.encode(emoji)) == emoji  # byte fallback: nothing becomes <unk>
    assert tok.sp.unk_id() not in tok.encode(emoji)


def test_sentencepiece_without_specials_gets_them_appended(tmp_path):
    import sentencepiece as spm

    words = [TEXT, "a small blue square at the top", "the green triangle in the center"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    tok = T.build_tokenizer(str(tmp_path / "plain.model"))
    base = tok.sp.get_piece_size()
    assert tok.appended == list(T.SPECIAL_TOKENS)  # Llama-2 style model: none were present
    assert [tok.image_token_id, tok.image_start_id, tok.image_end_id, tok.pad_id] == [base, base + 1, base + 2, base + 3]
    assert tok.vocab_size == base + 4
    _check_common(tok)
    assert tok.decode(tok.encode(f"red{T.IMAGE_TOKEN}top")) == f"red{T.IMAGE_TOKEN}top"


def test_hf_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + TEXT.split())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "hf")
    tok = T.build_tokenizer(str(tmp_path / "hf"))
    assert tok.kind == "huggingface" and tok.bos_id == 1 and tok.eos_id == 2
    _check_common(tok)
    # save + reload keeps every id
    tok.save(str(tmp_path / "saved"))
    again = T.build_tokenizer(str(tmp_path / "saved"))
    assert {k: v for k, v in again.metadata().items() if k != "path"} == {k: v for k, v in tok.metadata().items() if k != "path"}


def test_sentencepiece_save_and_reload(spm_path, tmp_path):
    tok = T.build_tokenizer(spm_path)
    tok.save(str(tmp_path / "saved"))
    again = T.build_tokenizer(str(tmp_path / "saved"))
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert {k: v for k, v in again.metadata().items() if k != "path"} == {k: v for k, v in tok.metadata().items() if k != "path"}


def test_hub_ids_are_not_downloaded():
    with pytest.raises(FileNotFoundError, match="hub ids are not downloaded"):
        T.build_tokenizer("meta-llama/Llama-2-7b-hf")


def test_train_tokenizer_cli_on_jsonl(tmp_path):
    import importlib.util
    import os

    from megatron_unihetero.data.preprocess.fixtures import write_jsonl

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", os.path.join(root, "tools", "train_tokenizer.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    path = write_jsonl(str(tmp_path / "t.jsonl.gz"), [{"text": f"{TEXT} number {i}", "other": 1} for i in range(100)])
    assert cli.main(["--input", path, "--vocab-size", "300", "--output", str(tmp_path / "m.model"), "--text-columns", "text"]) == 0
    tok = T.build_tokenizer(str(tmp_path / "m.model"))
    _check_common(tok)
    assert tok.pad_id == tok.sp.piece_to_id(T.PAD_TOKEN)


def test_tokenizers_without_bos_write_none(tmp_path):
    """A GPT-2-style HF tokenizer (EOS, no BOS, no pad) and a SentencePiece model trained with
    bos_id=-1: bos_id None (never EOS in its place), kept through save/reload and the shard
    metadata's JSON; documents, chat renderings and image prompts start with their content."""
    import io
    import json

    import sentencepiece as spm
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_unihetero.data import conversation
    from megatron_unihetero.data.preprocess.samples import SampleConfig, encode_document
    from megatron_unihetero.generation.sample import image_prompt

    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>"] + TEXT.split())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=None,
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt2")
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, format="PNG")
    png = png.getvalue()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT] * 50), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=30, hard_vocab_limit=False, bos_id=-1, minloglevel=2)
    for tok in (T.build_tokenizer(str(tmp_path / "gpt2")), T.build_tokenizer(str(tmp_path / "nobos.model"))):
        assert tok.bos_id is None and tok.bos_ids == [] and tok.eos_id >= 0, tok.kind
        assert json.loads(json.dumps(tok.metadata()))["bos_id"] is None
        tok.save(str(tmp_path / f"saved_{tok.kind}"))
        assert T.build_tokenizer(str(tmp_path / f"saved_{tok.kind}")).bos_id is None

        img = [tok.image_start_id, tok.image_token_id, tok.image_end_id]
        caption = encode_document([("image", png), ("text", TEXT, True)], tok, SampleConfig(image_size=16))
        assert caption.tokens.tolist() == img + tok.encode_plain(TEXT) + [tok.eos_id]
        qa = encode_document(conversation.render([{"role": "user", "content": "left?"},
                                                  {"role": "assistant", "content": "top"}]),
                             tok, SampleConfig(template="qa"))
        assert qa.tokens.tolist() == tok.encode_plain("Question: left? Answer: top") + [tok.eos_id]
        assert image_prompt(tok, "red") == tok.encode_plain("red") + [tok.image_start_id]
    messages = [{"role": "user", "content": "<image>left?"}]
    assert conversation.render_text(messages, None, "</s>", add_generation_prompt=True) == \
        conversation.IMAGE_PLACEHOLDER + "Question: left? Answer:"
