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
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, "vocab_size": 401})).save_pretrained(str(root / "llama401"))
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(root / "bert"))
    os.makedirs(root / "weightless")
    shutil.copy(root / "llama" / "config.json", root / "weightless" / "config.json")
    tok = train_tiny_tokenizer(str(root / "tok"))
    dinov2 = save_tiny_dinov2(str(root / "dinov2"))
    ckpt = import_hf(str(root / "llama"), str(root / "ckpt"), vision=dinov2, tp=2, tokenizer=tok)
    return dict(root=root, llama=str(root / "llama"), llama401=str(root / "llama401"),
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


@pytest.mark.parametrize("tp, pp, field", [(3, 1, "num_attention_heads"), (1, 3, "num_layers"),
                                           (2, 1, "vocab_size")])
def test_import_refuses_parallel_sizes_that_do_not_divide(folders, tmp_path, tp, pp, field):
    out = str(tmp_path / "out")
    llm = folders["llama401"] if field == "vocab_size" else folders["llama"]
    _fails(lambda: import_hf(llm, out, vision=folders["dinov2"], tp=tp, pp=pp, image_token_id=4),
           out, field, f"--{'tp' if tp > 1 else 'pp'} {max(tp, pp)}")


def test_export_refuses_broken_checkpoints(folders, tmp_path):
    out = str(tmp_path / "out")
    _fails(lambda: export_checkpoint(str(tmp_path / "nowhere"), out), out, "nowhere")
    _fails(lambda: export_checkpoint(folders["llama"], out), out, "latest")  # not a checkpoint
    _fails(lambda: export_checkpoint(folders["ckpt"], out, iteration=99), out, "iter_0000099")
    broken = str(tmp_path / "broken")
    shutil.copytree(folders["ckpt"], broken)
    os.remove(os.path.join(broken, "iter_0000000", "model", "tp01_pp00.safetensors"))
    _fails(lambda: export_checkpoint(broken, out), out, "tp01_pp00.safetensors")
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
    code = cli.main(["--llm", folders["llama"], "--vision", folders["dinov2"], "--save", out,
                     "--tp", "3", "--image-token-id", "4"])
    assert code == 2 and "--tp 3 does not divide" in capsys.readouterr().err
    assert not os.path.exists(out)
