"""Init from real-looking HF folders, end to end (benchmarks/rehearsal_7b.py at a tiny width).

A Llama folder whose own SentencePiece tokenizer.model has none of our specials (Llama-2's
case) + a DINOv2 folder run at half its resolution -> tools/convert_hf_to_checkpoint.py with
its defaults (the folder's tokenizer, the vocabulary grown and padded to 1024) -> shards from
that tokenizer -> 2 training steps at TP=2 on 2 gloo ranks from the checkpoint's own config ->
export -> transformers' processor and LlavaForConditionalGeneration give our logits.
"""

import io
import os

import pytest
import torch
import yaml

from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.testing.tools import load_tool


def pretrain_job(args):
    from megatron_unihetero.pretrain import main

    main(args)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.hf.rehearsal import save_dinov2_folder, save_llama_folder, train_plain_sentencepiece

    root = tmp_path_factory.mktemp("initpath")
    write_demo_data(str(root / "demo"), 48, seed=3, image_size=24, valid_fraction=0.0)
    parquet = str(root / "demo" / "train.parquet")
    spm = train_plain_sentencepiece([parquet], str(root / "plain.model"), vocab_size=320)
    llama = save_llama_folder(str(root / "llama"), spm, hidden_size=64, num_heads=4, ffn_hidden_size=96,
                              num_layers=2, max_positions=128)
    dinov2 = save_dinov2_folder(str(root / "dinov2"), hidden_size=32, num_layers=2, num_heads=2,
                                image_size=32, patch_size=8)
    return dict(root=root, parquet=parquet, llama=llama, dinov2=dinov2, spm=spm)


def test_import_grows_the_vocabulary_with_the_folders_own_tokenizer(folders, capsys):
    from safetensors.torch import load_file

    from megatron_unihetero import config_io
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.models.config import ModelConfig

    init = str(folders["root"] / "init")
    assert load_tool("convert_hf_to_checkpoint").main(
        ["--llm", folders["llama"], "--vision", folders["dinov2"], "--save", init, "--image-size", "16"]) == 0
    printed = capsys.readouterr().out
    tok = build_tokenizer(folders["spm"])
    assert tok.appended == ["<image>", "<image_start>", "<image_end>", "<pad>"]
    base = tok.base_vocab_size
    with open(os.path.join(init, "iter_0000000", "config.yaml")) as handle:
        run = yaml.safe_load(handle)
    assert run["model"]["llm"]["vocab_size"] == 1024  # base + 4, padded to 128 x 8
    assert run["model"]["image_token_id"] == tok.image_token_id == base
    assert run["model"]["vision"]["image_size"] == 16
    assert run["data"]["tokenizer"] == os.path.join(folders["llama"], "tokenizer.model")
    assert "--model.llm.vocab_size=1024" in printed and f"--model.image_token_id={base}" in printed

    iter_dir = os.path.join(init, "iter_0000000")
    tensors = dist_ckpt.load_full_model_state(iter_dir, config_io.from_dict(ModelConfig, run["model"]))
    hf = load_file(os.path.join(folders["llama"], "model.safetensors"))
    for ours, theirs in (("llm.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                         ("llm.output_layer.weight", "lm_head.weight")):
        grown = tensors[ours]
        assert grown.shape == (1024, 64)
        assert torch.equal(grown[:base], hf[theirs])  # the pretrained rows are untouched
        # transformers' mean resizing: every new row is the old rows' mean (to ~1e-9 x cov).
        mean = hf[theirs].mean(0)
        assert (grown[base:] - mean).abs().max() < 1e-5
        assert (grown[base:] - mean).abs().max() < (hf[theirs] - mean).abs().max() / 100


def test_train_at_tp2_and_export_reproduce_our_logits(folders):
    from PIL import Image

    from megatron_unihetero.data.demo_world import make_sample
    from megatron_unihetero.hf.rehearsal import logits_parity
    from megatron_unihetero.training import checkpoint as ckpt

    root = folders["root"]
    init = str(root / "init")
    if not os.path.isdir(init):
        pytest.skip("needs test_import_grows_the_vocabulary_with_the_folders_own_tokenizer")
    prefix = str(root / "shards" / "train")
    assert load_tool("preprocess_data").main(
        ["--input", folders["parquet"], "--output-prefix", prefix, "--tokenizer-model",
         os.path.join(folders["llama"], "tokenizer.model"), "--image-size", "16", "--workers", "1",
         "--no-progress"]) == 0
    run_dir = str(root / "run")
    # The import's own config.yaml is a complete run config: model, tokenizer; the run adds
    # data, layout and schedule.
    args = ["--config", os.path.join(init, "iter_0000000", "config.yaml"),
            f"--checkpoint.load={init}", f"--checkpoint.dir={run_dir}/ckpt", f"--logging.dir={run_dir}",
            f"--data.train=[{prefix}]", "--data.seq_length=64", "--data.micro_batch_size=2",
            "--data.num_workers=0", "--data.pack_window=64", "--parallel.tensor_parallel=2",
            "--train.steps=2", "--train.lr=1e-3", "--train.warmup_steps=1", "--train.dtype=fp32",
            "--checkpoint.save_interval=2", "--logging.log_interval=1", "--logging.eval_interval=0",
            "--logging.tensorboard=false", "--logging.progress_bar=false",
            "--model.llm.attention_impl=reference"]
    run_distributed_test(pretrain_job, 2, args, timeout_s=240)
    iter_dir = ckpt.latest_iteration_dir(f"{run_dir}/ckpt")
    assert iter_dir.endswith("iter_0000002")

    hf_dir = str(root / "hf")
    assert load_tool("convert_checkpoint_to_hf").main(["--load", f"{run_dir}/ckpt", "--save", hf_dir]) == 0
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = yaml.safe_load(handle)
    assert config["text_config"]["vocab_size"] == 1024 and config["vision_config"]["image_size"] == 16
    sample = make_sample(5, 0, image_size=24)  # a shapes-world image (24 px: resized to 16)
    image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
    result = logits_parity(iter_dir, hf_dir, image, " " + sample["caption"])
    assert result["num_image_tokens"] == 4  # (16 / 8)^2 patches, CLS dropped
    assert result["max_abs_logit"] > 0.1
    assert result["max_abs_diff"] < 1e-4, result


def test_a_folder_with_only_tokenizer_json_uses_it(folders, tmp_path):
    """No tokenizer.model: the folder's HF tokenizer (tokenizer.json) is the default."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_unihetero.hf import import_hf

    llama = tmp_path / "llama_json"
    shutil.copytree(folders["llama"], llama)
    os.remove(llama / "tokenizer.model")
    words = ["<unk>", "<s>", "</s>"] + "a large red circle at the top left".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(llama)
    ckpt = import_hf(str(llama), str(tmp_path / "ckpt"), vision=folders["dinov2"], vocab_divisible_by=8)
    with open(os.path.join(ckpt, "iter_0000000", "config.yaml")) as handle:
        run = yaml.safe_load(handle)
    # <image> is appended after the 10 words; the Llama's own rows (the SentencePiece's) stay.
    assert run["model"]["image_token_id"] == len(words)
    assert run["data"]["tokenizer"] == str(llama)
    with open(llama / "config.json") as handle:
        rows = yaml.safe_load(handle)["vocab_size"]
    # The Llama already has more rows than this tokenizer: nothing shrinks, only the padding.
    assert run["model"]["llm"]["vocab_size"] == -(-rows // 8) * 8
