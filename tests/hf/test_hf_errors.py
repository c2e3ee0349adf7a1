"""Wrong input gives a clear error naming the folder/field, and writes nothing."""

import os
import shutil

import pytest
import torch

from megatron_unihetero.hf import ConversionError, export_checkpoint, import_hf

LLAMA = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from megatron_unihetero.data.preprocess.fixtures import save_tiny_dinov2, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("errsrc")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(str(root / "llama"))
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(root / "bert"))
    os.makedirs(root / "weightless")
    shutil.copy(root / "llama" / "config.json", root / "weightless" / "config.json")
    tok = train_tiny_tokenizer(str(root / "tok"))
    dinov2 = save_tiny_dinov2(str(root / "dinov2"))
    ckpt = import_hf(str(root / "llama"), str(root / "ckpt"), vision=dinov2, tokenizer=tok)
    return dict(root=root, llama=str(root / "llama"),
                bert=str(root / "bert"), weightless=str(root / "weightless"), dinov2=dinov2,
                tok=tok, ckpt=ckpt)


def _fails(fn, out, *fragments):
    """``fn`` raises naming every fragment, and neither ``out`` nor a staging folder exists."""
    with pytest.raises((ConversionError, ValueError)) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(out)}.tmp-")]


def test_import_refuses_other_architectures(folders, tmp_path):
    out = str(tmp_path / "out")
    _fails(lambda: import_hf(folders["bert"], out, vision=folders["dinov2"], image_token_id=4),
           out, folders["bert"], "'bert'", "llama")
    _fails(lambda: import_hf(folders["llama"], out, vision=folders["bert"], image_token_id=4),
           out, "--vision", folders["bert"], "'bert'")


def test_import_refuses_missing_files(folders, tmp_path):
    out = str(tmp_path / "out")
    _fails(lambda: import_hf(str(tmp_path / "nowhere"), out, vision=folders["dinov2"], image_token_id=4),
           out, "nowhere", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(lambda: import_hf(str(empty), out, vision=folders["dinov2"], image_token_id=4),
           out, str(empty), "config.json")
    _fails(lambda: import_hf(folders["weightless"], out, vision=folders["dinov2"], image_token_id=4),
           out, folders["weightless"])
    _fails(lambda: import_hf(folders["llama"], out, image_token_id=4), out, "--vision")


def test_export_refuses_broken_checkpoints(folders, tmp_path):
    out = str(tmp_path / "out")
    _fails(lambda: export_checkpoint(str(tmp_path / "nowhere"), out), out, "nowhere")
    _fails(lambda: export_checkpoint(folders["llama"], out), out, "latest")  # not a checkpoint
    _fails(lambda: export_checkpoint(folders["ckpt"], out, iteration=99), out, "iter_0000099")
    broken = str(tmp_path / "broken")
    shutil.copytree(folders["ckpt"], broken)
    os.remove(os.path.join(broken, "iter_0000000", "dist", "__0_0.distcp"))
    _fails(lambda: export_checkpoint(broken, out), out, "dist/__0_0.distcp", "missing")
    _fails(lambda: export_checkpoint(folders["ckpt"], out, dtype="int8"), out, "--dtype")


def test_no_overwrite(folders, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        export_checkpoint(folders["ckpt"], str(out))
    with pytest.raises(ConversionError, match="already exists"):
        import_hf(folders["llama"], str(out), vision=folders["dinov2"], image_token_id=4)
    assert os.listdir(out) == ["keep.txt"]


def test_cli_reports_errors_without_traceback(folders, tmp_path, capsys):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_checkpoint", os.path.join(root, "tools", "convert_hf_to_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "out")
    code = cli.main(["--llm", folders["llama"], "--save", out, "--image-token-id", "4"])
    assert code == 2 and "--vision is required" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_import_without_a_tokenizer_or_a_bad_image_size_is_named(folders, tmp_path):
    out = str(tmp_path / "out")
    # The Llama folder has no tokenizer.model / tokenizer.json and none is given.
    _fails(lambda: import_hf(folders["llama"], out, vision=folders["dinov2"]), out,
           folders["llama"], "no tokenizer", "--tokenizer", "--image-token-id")
    # 20 px is not a multiple of the tiny Dinov2's 8 px patches.
    _fails(lambda: import_hf(folders["llama"], out, vision=folders["dinov2"], tokenizer=folders["tok"],
                             image_size=20), out, "vision.image_size=20", "patch_size=8")
    _fails(lambda: import_hf(folders["llama"], out, vision=folders["dinov2"], tokenizer=folders["tok"],
                             vocab_divisible_by=0), out, "--vocab-divisible-by")


def test_training_config_refuses_a_vocabulary_tp_does_not_divide():
    from megatron_unihetero.models.config import ConfigError, LLMConfig, ModelConfig
    from megatron_unihetero.training.config import ParallelConfig, RunConfig

    run = RunConfig(model=ModelConfig(llm=LLMConfig(vocab_size=1001)), parallel=ParallelConfig(tensor_parallel=2))
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 does not divide model.llm.vocab_size=1001.*"
                                          r"--vocab-divisible-by"):
        run.validate(2)
