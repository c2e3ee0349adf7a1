"""LLaVA conversation inputs, HF-datasets parquet, and the one conversation template (train = serve)."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_unihetero.data import conversation
from megatron_unihetero.data.collate import expand_sample
from megatron_unihetero.data.dataset import Sample as ShardSample
from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
from megatron_unihetero.data.preprocess.images import decode_image
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_unihetero.data.preprocess.readers import count_rows, iter_json_array, iter_records
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.shards import ShardReader, list_shards
from megatron_unihetero.data.tokenizer import build_tokenizer

SIZE = 16


def _image_file(path, seed, size=(24, 20), fmt="PNG"):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    tok_path = train_tiny_tokenizer(str(root))
    images = root / "images"
    rel = ["coco/train2017/000000001.png", "gqa/images/a/b/2354786.png", "ocr_vqa/images/x.png", "vg/VG_100K/2.png"]
    for i, r in enumerate(rel):
        _image_file(str(images / r), i)
    (images / "coco" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return {"root": root, "tok_path": tok_path, "tok": build_tokenizer(tok_path), "images": str(images), "rel": rel}


def run(env, inputs, name, **kw):
    sample_kw = {k: kw.pop(k) for k in list(kw) if k in SampleConfig.__dataclass_fields__}
    sample_kw.setdefault("image_size", SIZE)
    sample_kw.setdefault("image_path_root", env["images"])
    sample_kw.setdefault("template", "conversation")  # tools/preprocess_data.py's default for llava
    cfg = PreprocessConfig(inputs=list(inputs), output_prefix=str(env["root"] / name), tokenizer_model=env["tok_path"],
                           sample=SampleConfig(**sample_kw), progress=False, input_format=kw.pop("input_format", "llava"),
                           chunk_size=3, max_reject_fraction=1.0, **kw)
    summary = run_preprocess(cfg)
    samples = []
    for shard in list_shards(cfg.output_prefix):
        r = ShardReader(shard)
        samples += [(r.tokens(i).tolist(), r.images(i), r.loss_mask(i).tolist()) for i in range(len(r))]
    rejects = [json.loads(line) for line in open(summary["rejects_file"])]
    return summary, samples, rejects


def _pixels(env, rel):
    return decode_image(open(os.path.join(env["images"], rel), "rb").read(), SIZE)


def test_pretrain_json_array_captions_and_rejects(env):
    rel = env["rel"]
    records = [
        {"id": "a", "image": rel[0], "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                       {"from": "gpt", "value": "a red circle"}]},
        {"id": "b", "image": "coco/missing.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                   {"from": "gpt", "value": "nothing"}]},
        {"id": "c", "image": rel[1], "conversations": [{"from": "human", "value": "Render a caption.\n<image>"},
                                                       {"from": "gpt", "value": "two blue squares"}]},
        {"id": "d", "image": "coco/broken.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                  {"from": "gpt", "value": "x"}]},
    ]
    path = env["root"] / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(records, indent=2))
    summary, samples, rejects = run(env, [str(path)], "pretrain", template="caption")
    tok = env["tok"]
    img = [tok.image_start_id, tok.image_token_id, tok.image_end_id]
    assert summary["rows"] == 4 and summary["samples"] == 2 and summary["rejected"] == 2
    assert summary["rejects_by_reason"] == {"bad_image": 1, "missing_image_file": 1}
    for (tokens, images, mask), caption, r in zip(samples, ["a red circle", "two blue squares"], rel[:2]):
        assert tokens == [tok.bos_id] + img + tok.encode(caption) + [tok.eos_id]
        assert mask == [1, 0, 0, 0] + [1] * (len(tokens) - 4)  # the caption template's
        assert np.array_equal(images, _pixels(env, r)[None])
    by_row = {r["row"]: r for r in rejects}
    assert by_row[1]["reason"] == "missing_image_file" and os.path.join(env["images"], "coco/missing.png") in by_row[1]["detail"]
    assert by_row[3]["reason"] == "bad_image" and "coco/broken.png" in by_row[3]["detail"]
    assert by_row[1]["file"] == str(path)

    # The conversation template on the same file: the instruction is the prompt, the reply the target.
    _, conv, _ = run(env, [str(path)], "pretrain_conv")
    tokens, _, mask = conv[1]
    # "<image>" after the text stands where it is: after the question text.
    answer = tok.encode(" Answer: two blue squares")
    assert tokens == [tok.bos_id] + tok.encode("Question: Render a caption.") + img + answer + [tok.eos_id]
    n_prompt = len(tok.encode(" Answer:"))
    assert mask == [0] * (len(tokens) - len(answer) - 1 + n_prompt) + [1] * (len(answer) - n_prompt + 1)


def test_instruct_jsonl_multi_turn_several_images(env):
    rel, tok = env["rel"], env["tok"]
    rows = [
        {"id": "m", "image": [rel[2], rel[3]], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is brighter?"},
            {"from": "gpt", "value": "The first one."},
            {"from": "human", "value": "And the colour?"},
            {"from": "gpt", "value": "Mostly green."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
        {"id": "n", "image": rel[0], "conversations": [{"from": "human", "value": "<image> <image> two?"},
                                                       {"from": "gpt", "value": "no"}]},
        {"id": "s", "image": rel[0], "conversations": [{"from": "system", "value": "be brief"},
                                                       {"from": "gpt", "value": "ok"}]},
    ]
    path = env["root"] / "instruct.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary, samples, rejects = run(env, [str(path)], "instruct")
    assert summary["samples"] == 2 and summary["rejects_by_reason"] == {"bad_conversation": 1, "image_placeholders": 1}
    img = [tok.image_start_id, tok.image_token_id, tok.image_end_id]

    def turn(question, answer):
        """(ids, mask) of one exchange, built by hand: prompt, then answer + EOS as targets."""
        prompt = tok.encode(f"Question: {question} Answer:")
        whole = tok.encode(f"Question: {question} Answer: {answer}")
        assert whole[:len(prompt)] == prompt
        return whole + [tok.eos_id], [0] * len(prompt) + [1] * (len(whole) - len(prompt) + 1)

    (t1, m1), (t2, m2) = turn("Which is brighter?", "The first one."), turn("And the colour?", "Mostly green.")
    tokens, images, mask = samples[0]
    assert tokens == [tok.bos_id] + img + img + t1 + t2
    assert mask == [0] + [0] * 6 + m1 + m2
    assert np.array_equal(images, np.stack([_pixels(env, rel[2]), _pixels(env, rel[3])]))
    tokens, images, mask = samples[1]  # text-only conversation
    t, m = turn("Say hi", "hi")
    assert tokens == [tok.bos_id] + t and mask == [0] + m and images.shape == (0, SIZE, SIZE, 3)
    assert {r["row"]: r["reason"] for r in rejects} == {2: "image_placeholders", 3: "bad_conversation"}


def test_hf_datasets_parquet_with_struct_images(env):
    """An HF `datasets` export: the image column is a struct {bytes, path}."""
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 77, np.uint8)).save(buf, format="PNG")
    rows = [{"image": {"bytes": buf.getvalue(), "path": "ignored.png"}, "caption": "a grey field"},
            {"image": {"bytes": None, "path": env["rel"][0]}, "caption": "from a path"},
            {"image": {"bytes": None, "path": "nowhere.png"}, "caption": "missing"}]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([r["image"] for r in rows], type=image_type),
                      "caption": [r["caption"] for r in rows]})
    path = str(env["root"] / "hf.parquet")
    pq.write_table(table, path)
    summary, samples, rejects = run(env, [path], "hf", input_format="parquet", template="caption")
    tok = env["tok"]
    assert summary["samples"] == 2 and [r["reason"] for r in rejects] == ["missing_image_file"]
    assert samples[0][0] == [tok.bos_id, tok.image_start_id, tok.image_token_id, tok.image_end_id] + \
        tok.encode("a grey field") + [tok.eos_id]
    assert (samples[0][1] == 77).all()
    assert np.array_equal(samples[1][1][0], _pixels(env, env["rel"][0]))


def test_json_array_reader_streams(tmp_path):
    elements = [{"id": i, "v": "x" * (i * 7 % 50), "n": 12345 + i, "nested": [1, {"a": [2.5, None]}]} for i in range(40)]
    path = tmp_path / "a.json"
    path.write_text("  [\n" + ",\n ".join(json.dumps(e) for e in elements) + " ]\n")
    # Tiny blocks: elements and numbers cross block boundaries all the time.
    assert list(iter_json_array(str(path), read_size=5)) == elements
    assert count_rows(str(path), "llava", exact=True) == 40
    assert [r for r, _ in iter_records(str(path), "llava", row_range=(10, 13))] == [10, 11, 12]
    (tmp_path / "empty.json").write_text("[ ]")
    assert list(iter_json_array(str(tmp_path / "empty.json"))) == []
    (tmp_path / "bad.json").write_text('[{"a": 1}, {"a": 2,, }]')
    with pytest.raises(ValueError, match=r"bad\.json: element 1: invalid JSON at character 19"):
        list(iter_json_array(str(tmp_path / "bad.json"), read_size=4))
    (tmp_path / "cut.json").write_text('[{"a": 1}, {"a": 2}')
    with pytest.raises(ValueError, match=r"cut\.json: after element 1: expected ',' or ']'"):
        list(iter_json_array(str(tmp_path / "cut.json")))
    (tmp_path / "mixed.json").write_text('[{"a": 1}, 7]')
    assert [type(r).__name__ for _, r in iter_records(str(tmp_path / "mixed.json"), "llava")] == ["dict", "RowError"]


def _tiny_processor(env, folder):
    """The processor the HF export writes (hf/export.py calls these two), saved and reloaded."""
    from transformers import AutoProcessor

    from megatron_unihetero.hf import processor as processor_lib
    from megatron_unihetero.models.config import LLMConfig, ModelConfig, VisionConfig

    ours, fast = processor_lib.hf_tokenizer(env["tok_path"])
    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
              patch_size=8)
    cfg = ModelConfig(llm=LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                    ffn_hidden_size=96, vocab_size=512, max_sequence_length=64),
                      vision=VisionConfig(model_type="dinov2", hf_config=hf), image_token_id=ours.image_token_id)
    processor_lib.llava_processor(cfg, fast).save_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)


def test_exported_chat_template_gives_the_preprocessed_ids(env):
    from megatron_unihetero.hf.processor import calling_paths

    rel, tok = env["rel"], env["tok"]
    record = {"id": "x", "image": rel[0], "conversations": [
        {"from": "human", "value": "<image>\nis there a red square?"}, {"from": "gpt", "value": "yes, at the top"},
        {"from": "human", "value": "and a circle?"}, {"from": "gpt", "value": "no"}]}
    path = env["root"] / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    _, samples, _ = run(env, [str(path)], "chat")
    tokens, images, mask = samples[0]

    processor = _tiny_processor(env, str(env["root"] / "hf_processor"))
    image = Image.open(os.path.join(env["images"], rel[0]))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "is there a red square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes, at the top"}]},
        {"role": "user", "content": [{"type": "text", "text": "and a circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    # The tokenizer's rendering: exactly the shard's ids, and its assistant mask is the loss mask.
    text_only = processor.tokenizer.apply_chat_template(
        [{**m, "content": [{k: v for k, v in it.items() if k != "image"} for it in m["content"]]} for m in messages],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert text_only["input_ids"] == tokens
    assert text_only["assistant_masks"] == mask
    # The processor's: the ids the model trains on (the loader expands <image> to its tokens) ...
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    tokens_per_image = (SIZE // 8) ** 2
    expanded, _ = expand_sample(ShardSample(np.asarray(tokens), images, None, "chat", 0), tok.image_token_id,
                                tokens_per_image)
    assert list(out["input_ids"][0]) == expanded.tolist()
    # ... and the serving prompt of the first question is the training document up to its answer.
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    first_target = mask.index(1)
    assert list(prompt["input_ids"][0]) == expand_sample(
        ShardSample(np.asarray(tokens[:first_target]), images, None, "chat", 0), tok.image_token_id, tokens_per_image)[0].tolist()
    assert conversation.render_text(messages, "<s>", "</s>") == processor.apply_chat_template(messages, tokenize=False)
    # Every other way of calling it gives the same ids: the rendered chat given to the processor
    # or the tokenizer (lmms-eval's and VLMEvalKit's recipe) has one BOS, not two.
    paths = calling_paths(processor, messages, [image], add_generation_prompt=False)
    for name, ids in paths.items():
        assert ids == (tokens if name.startswith("tokenizer") else expanded.tolist()), name
    # ... and so does the record's own LLaVA text as string contents.
    llava = [{"role": conversation.ROLES[j % 2], "content": t["value"]} for j, t in enumerate(record["conversations"])]
    text = processor.apply_chat_template(llava, tokenize=False)
    assert list(processor(text=text, images=image)["input_ids"][0]) == expanded.tolist()
    assert processor.tokenizer(text)["input_ids"] == tokens


def test_cli_defaults():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("preprocess_tool", os.path.join(root, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--output-prefix", "o", "--tokenizer-model", "t.model"]
    llava = tool.parse_args(["--input", "x.json", "--input-format", "llava", "--image-root", "/imgs"] + base)
    assert llava.sample.template == "conversation" and llava.sample.image_path_root == "/imgs"
    assert llava.image_store == "encoded" and llava.sample.image_format == "auto"
    plain = tool.parse_args(["--input", "x.parquet", "--image-store", "pixels", "--num-shards", "4",
                             "--shard-index", "3"] + base)
    assert plain.sample.template == "caption" and plain.image_store == "pixels" and plain.job_prefix.endswith(
        "o.part00003-of-00004")
    with pytest.raises(SystemExit):
        tool.parse_args(["--input", "x.parquet", "--num-shards", "2", "--shard-index", "2"] + base)
