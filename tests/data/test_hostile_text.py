"""Text as others write it: special strings in captions are plain text, invalid UTF-8 and
malformed LLaVA turns are named rejects, duplicate ids are counted; good rows are all kept."""

import json
import os

import numpy as np
import pytest

from megatron_unihetero.data import tokenizer as T
from megatron_unihetero.data.preprocess import pipeline
from megatron_unihetero.data.preprocess.fixtures import png_bytes, train_tiny_tokenizer, write_webdataset
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.shards import ShardReader, list_shards
from megatron_unihetero.testing.tools import load_tool

SIZE = 16
HOSTILE = "a red <image> circle <pad> and <image_start>x<image_end> </s> <s> done"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    imgs = root / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png_bytes(1))
    return {"root": root, "imgs": str(imgs), "tok_path": train_tiny_tokenizer(str(root))}


def _special_ids(tok):
    return {tok.image_token_id, tok.image_start_id, tok.image_end_id, tok.pad_id, tok.bos_id, tok.eos_id}


def test_special_strings_in_data_text_are_plain_text_for_every_tokenizer_kind(env, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    trained_in = T.build_tokenizer(env["tok_path"])  # the specials are user-defined symbols in it
    assert trained_in.sp.id_to_piece(trained_in.image_token_id) == T.IMAGE_TOKEN
    words = ["a red circle and done", "x at the top"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    appended = T.build_tokenizer(str(tmp_path / "plain.model"))  # Llama-2 style: specials appended
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>"] + sorted(set(HOSTILE)))}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast.save_pretrained(str(tmp_path / "hf"))
    hf = T.build_tokenizer(str(tmp_path / "hf"))
    for tok in (trained_in, appended, hf):
        plain = tok.encode_plain(HOSTILE)
        assert not set(plain) & _special_ids(tok), tok.kind
        assert tok.decode(plain).replace(" ", "") == HOSTILE.replace(" ", ""), tok.kind
        # rendered text (a chat template's output) still has its specials
        assert tok.encode(T.IMAGE_TOKEN) == [tok.image_token_id]
        assert tok.encode_plain("a red circle") == tok.encode("a red circle")
    assert trained_in.decode(trained_in.encode_plain(HOSTILE)) == HOSTILE  # exactly, whitespace too


def _run(env, name, rows=None, path=None, **cfg):
    path = path or str(env["root"] / f"{name}.jsonl")
    if rows is not None:
        with open(path, "wb") as f:
            f.write(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    sample = cfg.pop("sample", SampleConfig(image_size=SIZE, image_path_root=env["imgs"]))
    out = str(env["root"] / name)
    summary = pipeline.run_preprocess(pipeline.PreprocessConfig(
        inputs=[path], output_prefix=out, tokenizer_model=env["tok_path"], sample=sample, progress=False,
        max_reject_fraction=1.0, **cfg))
    rejects = [json.loads(line) for line in open(out + ".rejects.jsonl")]
    return summary, {r["row"]: r for r in rejects}, out


def test_a_caption_with_special_strings_is_stored_as_text_with_one_placeholder_per_image(env):
    summary, rejects, out = _run(env, "specials", [{"image": "a.png", "caption": HOSTILE},
                                                   {"image": "a.png", "caption": "<pad><pad><pad>"}])
    assert summary["samples"] == 2 and not rejects
    tok = T.build_tokenizer(env["tok_path"])
    reader = ShardReader(list_shards(out)[0])
    for i, caption in enumerate([HOSTILE, "<pad><pad><pad>"]):
        tokens = reader.tokens(i).tolist()
        assert tokens.count(tok.image_token_id) == 1 == len(reader.images(i))
        assert tok.pad_id not in tokens and tokens.count(tok.bos_id) == 1 and tokens.count(tok.eos_id) == 1
        text = tok.decode(tokens[4:-1])  # after BOS + the image's three placeholders, before EOS
        assert text.replace(" ", "") == caption.replace(" ", "")


def test_invalid_utf8_rejects_its_line_or_member_and_replace_is_an_opt_in(env, capsys):
    rows = [{"image": "a.png", "caption": "good one"},
            b'{"image": "a.png", "caption": "bad \xff\xfe bytes"}\n',
            {"image": "a.png", "caption": "good two"}]
    summary, rejects, _ = _run(env, "utf8", rows)
    assert summary["samples"] == 2 and summary["rejects_by_reason"] == {"bad_utf8": 1}
    assert "line 2: invalid UTF-8 at byte" in rejects[1]["detail"]
    summary, rejects, out = _run(env, "utf8_replace", path=str(env["root"] / "utf8.jsonl"), invalid_utf8="replace")
    assert summary["samples"] == 3 and not rejects
    tok = T.build_tokenizer(env["tok_path"])
    assert tok.decode(ShardReader(list_shards(out)[0]).tokens(1)).endswith("bytes")  # the row is kept
    # webdataset: the member is named
    tar = write_webdataset(str(env["root"] / "utf8.tar"), [{"png": png_bytes(2), "txt": b"fine"},
                                                           {"png": png_bytes(3), "txt": b"caf\xe9"}])
    summary, rejects, _ = _run(env, "utf8_tar", path=tar)
    assert summary["samples"] == 1 and rejects[1]["reason"] == "bad_utf8"
    assert "member 000001.txt: invalid UTF-8 at byte 3" in rejects[1]["detail"]
    # a JSON array cannot skip a bad element: the tool says which, exit 2, no traceback
    array = env["root"] / "utf8_array.json"
    array.write_bytes(b'[{"image": "a.png", "conversations": []},\n {"id": "caf\xe9"}]')
    code = load_tool("preprocess_data").main(["--input", str(array), "--output-prefix", str(env["root"] / "arr"),
                                              "--tokenizer-model", env["tok_path"], "--no-progress"])
    assert code == 2
    assert f"error: {array}: invalid UTF-8 at byte 54 (invalid continuation byte)" in capsys.readouterr().err


def test_malformed_llava_turns_are_named_rejects_and_duplicate_ids_are_counted(env):
    good = {"id": "x1", "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a circle"}]}
    rows = [good,
            dict(good, id="x2", conversations=["a string turn", {"from": "gpt", "value": "x"}]),
            dict(good, id="x3", conversations=[None, {"from": "gpt", "value": "x"}]),
            dict(good, id="x4", conversations=[{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]),
            dict(good, id="x5", conversations=[{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]),
            dict(good, id="x6", conversations="not a list"),
            dict(good, id="x7", conversations=[{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}]),
            good, dict(good, id=7), dict(good, id="7")]
    sample = SampleConfig(template="conversation", image_size=SIZE, image_path_root=env["imgs"])
    summary, rejects, _ = _run(env, "llava", rows, sample=sample, input_format="llava")
    assert {row: r["reason"] for row, r in rejects.items()} == {
        1: "wrong_type", 2: "wrong_type", 3: "bad_conversation", 4: "wrong_type", 5: "missing_column",
        6: "image_placeholders"}
    assert "conversations[0] must be {'from': str, 'value': str}, got 'a string turn'" in rejects[1]["detail"]
    assert "speaker ['human']" in rejects[3]["detail"]
    assert summary["samples"] == 4 and summary["duplicate_ids"] == 1  # row 7 repeats "x1"; 7 and "7" differ
    assert "duplicate ids: 1" in pipeline.format_summary(summary, 1.0)
    assert not any(r["reason"] == "error" for r in rejects.values())
    assert np.isfinite(summary["seconds"]) and os.path.exists(summary["rejects_file"])


def test_a_lone_surrogate_from_a_json_escape_is_a_named_reject(env):
    """Valid JSON, not Unicode: "\\ud800" decodes to a lone surrogate, which no tokenizer takes
    (SentencePiece raised an opaque pybind11 cast error)."""
    rows = [b'{"image": "a.png", "caption": "lone \\ud800 surrogate"}\n', {"image": "a.png", "caption": "fine"}]
    summary, rejects, _ = _run(env, "surrogate", rows)
    assert summary["samples"] == 1 and summary["rejects_by_reason"] == {"bad_utf8": 1}
    assert "'\\ud800' at character 5 (a lone UTF-16 surrogate" in rejects[0]["detail"]
