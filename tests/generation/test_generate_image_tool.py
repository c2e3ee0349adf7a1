"""tools/generate_image.py (generation/image_cli.py), called in this process: it writes valid
PNGs of the VAE's size from a saved checkpoint, and bad input is one line and exit status 2."""

import os

import pytest
import torch

from tests.objectives._jobs import tiny_config


def _save(workdir, name, model_cfg, tokenizer_path):
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.config_io import save_config
    from megatron_unihetero.training.config import DataConfig, RunConfig

    model = parallel.build_model(model_cfg)
    if model.pixel_head is not None:  # adaLN-Zero: an untrained denoiser outputs zeros
        with torch.no_grad():
            model.pixel_head.denoiser.output.weight.normal_(0.0, 0.05)
    iteration = os.path.join(workdir, name, "iter_0000002")
    dist_ckpt.save_weights([model], iteration)
    save_config(RunConfig(model=model_cfg, data=DataConfig(tokenizer=tokenizer_path)),
                os.path.join(iteration, "config.yaml"))
    with open(os.path.join(workdir, name, "latest"), "w") as handle:
        handle.write("iter_0000002\n")
    return os.path.join(workdir, name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_unihetero import parallel
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.tokenizer import build_tokenizer

    workdir = str(tmp_path_factory.mktemp("generate_image"))
    tokenizer_path = train_tiny_tokenizer(os.path.join(workdir, "tok"))
    tokenizer = build_tokenizer(tokenizer_path)
    with parallel.single_process(seed=3):
        made = {}
        for name, pixel, semantic in (("pixel", True, True), ("semantic_only", False, True),
                                      ("pixel_only", True, False)):
            cfg = tiny_config(pixel_weight=1.0 if pixel else 0.0, routing="shared",
                              semantic_weight=1.0 if semantic else 0.0)
            cfg.llm.vocab_size, cfg.image_token_id = 512, tokenizer.image_token_id
            if pixel:
                cfg.pixel.cond_dropout, cfg.pixel.null_token_id = 0.1, tokenizer.pad_id
            made[name] = _save(workdir, name, cfg, tokenizer_path)
        # Trained on documents without BOS: with this tokenizer's BOS, guidance would null
        # another prompt than training did.
        cfg = tiny_config(pixel_weight=1.0, routing="shared", semantic_weight=1.0)
        cfg.llm.vocab_size, cfg.image_token_id = 512, tokenizer.image_token_id
        cfg.pixel.cond_dropout, cfg.pixel.null_token_id = 0.1, tokenizer.pad_id
        cfg.documents_start_with_bos = False
        made["no_bos"] = _save(workdir, "no_bos", cfg, tokenizer_path)
        # Untrained denoisers: with epsilon prediction DDIM's first step (from alpha-bar ~ 2e-9)
        # multiplies the head's error by ~2e4; with v prediction the clean latent stays bounded.
        for prediction in ("epsilon", "v"):
            cfg = tiny_config(pixel_weight=1.0, routing="shared", semantic_weight=1.0)
            cfg.llm.vocab_size, cfg.image_token_id = 512, tokenizer.image_token_id
            cfg.pixel.prediction = prediction
            made[f"untrained_{prediction}"] = _save(workdir, f"untrained_{prediction}", cfg,
                                                    tokenizer_path)
        yield workdir, made


def _run(argv, capsys):
    from megatron_unihetero.generation import image_cli

    code = image_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_pngs_of_the_vae_size(checkpoints, capsys):
    from PIL import Image

    workdir, made = checkpoints
    single = os.path.join(workdir, "one.png")
    code, out, err = _run(["--load", made["pixel"], "--prompt", "a red circle", "--out", single,
                           "--steps", "3", "--cfg-scale", "2"], capsys)
    assert code == 0, err
    assert f"wrote {single} (32x32)" in out
    folder = os.path.join(workdir, "many")
    os.makedirs(folder)
    code, out, err = _run(["--load", made["pixel"], "--prompt", "a red circle", "--prompt",
                           "a large blue cross at the top", "--out", folder, "--steps", "3"], capsys)
    assert code == 0, err
    for name in ("image_000.png", "image_001.png"):
        with Image.open(os.path.join(folder, name)) as image:
            assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    assert os.path.isfile(os.path.join(folder, "generate_image.log"))  # the libraries' warnings


def test_errors_are_one_line(checkpoints, capsys):
    workdir, made = checkpoints
    out = os.path.join(workdir, "x.png")
    cases = [
        (["--load", made["semantic_only"], "--prompt", "a", "--out", out], "model.pixel.weight > 0"),
        (["--load", made["pixel_only"], "--prompt", "a", "--out", out], "model.semantic.weight > 0"),
        (["--load", os.path.join(workdir, "nothing"), "--prompt", "a", "--out", out], "does not exist"),
        (["--load", made["pixel"], "--prompt", "  ", "--out", out], "is empty"),
        (["--load", made["pixel"], "--prompt", "a", "--out", os.path.join(workdir, "no", "x.png")],
         "does not exist"),
        (["--load", made["pixel"], "--prompt", "a", "--prompt", "b", "--out", out], "existing folder"),
        (["--load", made["pixel"], "--prompt", "a", "--out", out, "--cfg-scale", "-1"], "cfg_scale"),
        (["--load", made["pixel"], "--prompt", "a", "--out", out, "--cfg-scale", "nan"], "cfg_scale"),
        (["--load", made["pixel"], "--prompt", "a", "--out", out, "--steps", "5000"], "noise levels"),
        (["--load", made["pixel"], "--prompt", "a " * 60, "--out", out], "max_sequence_length"),
        (["--load", made["pixel"], "--prompt", "a", "--out", out, "--tokenizer",
          os.path.join(workdir, "missing.model")], "not found"),
        (["--load", made["no_bos"], "--prompt", "a", "--out", out, "--cfg-scale", "2"],
         "has a BOS but the model was trained with model.documents_start_with_bos=False"),
    ]
    for argv, message in cases:
        code, stdout, err = _run(argv, capsys)
        assert code == 2, (argv, stdout, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
        assert not os.path.exists(out)


def test_a_diverged_sampler_is_named_not_silent(checkpoints, capsys):
    workdir, made = checkpoints
    out_path = os.path.join(workdir, "diverged.png")
    code, out, err = _run(["--load", made["untrained_epsilon"], "--prompt", "a red circle", "--out", out_path,
                           "--steps", "3"], capsys)
    assert code == 0 and os.path.isfile(out_path), err
    assert "warning: prompt 1's latents have std" in err and "pixel.prediction=v" in err
    code, out, err = _run(["--load", made["untrained_v"], "--prompt", "a red circle", "--out",
                           out_path, "--steps", "3"], capsys)
    assert code == 0 and "warning" not in err, err
