"""HF -> checkpoint: config fidelity, strict loading at TP=2 and PP=2, and exact round trips."""

import os

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_unihetero.testing import run_distributed_test

LLAMA = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False)


def save_llama(folder, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).save_pretrained(folder)
    return folder


def load_checkpoint_job(ckpts):
    """Each checkpoint loads strictly into a model built at the given TP/PP from its config.yaml."""

    from megatron_unihetero import config_io, parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.models.config import ModelConfig

    for ckpt, tp, pp in ckpts:
        iter_dir = os.path.join(ckpt, "iter_0000000")
        with open(os.path.join(iter_dir, "config.yaml")) as handle:
            cfg = config_io.from_dict(ModelConfig, yaml.safe_load(handle)["model"])
        parallel.initialize(tp, pp, seed=99)
        model = parallel.build_model(cfg)
        dist_ckpt.load_model([model], dist_ckpt.dist_dir(iter_dir))
        parallel.destroy()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megatron_unihetero.data.preprocess.fixtures import save_tiny_dinov2, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("hfsrc")
    return dict(llama=save_llama(str(root / "llama")), dinov2=save_tiny_dinov2(str(root / "dinov2")),
                tokenizer=train_tiny_tokenizer(str(root / "tok")), root=root)


@pytest.fixture(scope="module")
def imported(sources):
    """One import: the checkpoint has no parallel layout (each rank reads its slices)."""
    from megatron_unihetero.hf import import_hf

    return import_hf(sources["llama"], str(sources["root"] / "ckpt"), vision=sources["dinov2"],
                     tokenizer=sources["tokenizer"])


def test_config_matches_hf(sources, imported):
    with open(os.path.join(imported, "iter_0000000", "config.yaml")) as handle:
        run = yaml.safe_load(handle)
    llm, vision = run["model"]["llm"], run["model"]["vision"]
    # 400 rows (the tokenizer's specials are trained in: nothing to append), padded to 128 x 8.
    assert (llm["vocab_size"], llm["hidden_size"], llm["num_layers"]) == (1024, 64, 2)
    assert (llm["num_attention_heads"], llm["num_query_groups"], llm["ffn_hidden_size"]) == (4, 2, 96)
    assert (llm["rotary_base"], llm["norm_epsilon"], llm["max_sequence_length"]) == (5000.0, 1e-6, 64)
    assert vision["model_type"] == "dinov2" and vision["path"] == os.path.abspath(sources["dinov2"])
    assert run["model"]["image_token_id"] == 4  # the tokenizer's <image>
    assert run["data"]["tokenizer"] == sources["tokenizer"]
    with open(os.path.join(imported, "latest")) as handle:
        assert handle.read().strip() == "iter_0000000"
    assert os.path.isfile(os.path.join(imported, "iter_0000000", "dist", ".metadata"))
    assert os.path.isfile(os.path.join(imported, "iter_0000000", "manifest.json"))


def test_the_checkpoint_loads_strictly_at_any_layout(imported):
    run_distributed_test(load_checkpoint_job, 2, [(imported, 2, 1), (imported, 1, 2)])


def test_round_trip_hf_ours_hf_is_exact(sources, imported, tmp_path):
    from transformers import Dinov2Model, LlamaForCausalLM

    from megatron_unihetero.hf import export_checkpoint, import_hf

    # Llama + Dinov2 -> ours -> Llava: the LLM and vision tensors come back unchanged (the
    # vocabulary padded from 400 to 1024 rows: the first 400 are the Llama's).
    first = export_checkpoint(imported, str(tmp_path / "hf1"))
    llava = load_file(os.path.join(first, "model.safetensors"))
    llama = LlamaForCausalLM.from_pretrained(sources["llama"]).state_dict()
    for name, tensor in llama.items():
        key = "language_model.lm_head.weight" if name == "lm_head.weight" else "language_model." + name
        ours = llava[key]
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            assert ours.shape == (1024, 64)
            ours = ours[:400]
        assert torch.equal(ours, tensor), name
    dinov2 = Dinov2Model.from_pretrained(sources["dinov2"]).state_dict()
    assert torch.equal(llava["vision_tower.encoder.layer.1.attention.attention.query.weight"],
                       dinov2["encoder.layer.1.attention.q_proj.weight"])
    assert sum(k.startswith("vision_tower.") for k in llava) == len(dinov2)

    # Llava -> ours (heads included) -> Llava: every tensor and the heads are identical.
    ckpt = import_hf(first, str(tmp_path / "ckpt_back"))
    second = export_checkpoint(ckpt, str(tmp_path / "hf2"))
    for file_name in ("model.safetensors", "unihetero_heads.safetensors"):
        a = load_file(os.path.join(first, file_name))
        b = load_file(os.path.join(second, file_name))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (file_name, name)
    with open(os.path.join(first, "config.json")) as f1, open(os.path.join(second, "config.json")) as f2:
        assert f1.read() == f2.read()


@pytest.mark.parametrize("kind", ["siglip", "clip", "dinov2_with_registers"])
def test_other_towers_export_and_load_at_another_image_size(sources, tmp_path, kind):
    """Each family imports with --image-size 16 (its folder says 32) and exports to a Llava
    whose tower, at 16 px, computes exactly our encoder's features (position embeddings
    interpolated once by transformers' own code), with the processor's token count."""
    import transformers

    from megatron_unihetero import config_io
    from megatron_unihetero.hf import export_checkpoint, import_hf
    from megatron_unihetero.models.config import ModelConfig
    from megatron_unihetero.models.vision import VisionEncoder, tokens_per_image

    config_cls, model_cls = {"siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
                             "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
                             "dinov2_with_registers": ("Dinov2WithRegistersConfig",
                                                       "Dinov2WithRegistersModel")}[kind]
    torch.manual_seed(1)
    tower = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8))
    tower.save_pretrained(str(tmp_path / kind))
    ckpt = import_hf(sources["llama"], str(tmp_path / "ckpt"), vision=str(tmp_path / kind),
                     tokenizer=sources["tokenizer"], image_size=16)
    with open(os.path.join(ckpt, "iter_0000000", "config.yaml")) as handle:
        cfg = config_io.from_dict(ModelConfig, yaml.safe_load(handle)["model"])
    out = export_checkpoint(ckpt, str(tmp_path / "hf"))
    on_disk = load_file(os.path.join(out, "model.safetensors"))
    prefix = "vision_tower." if kind.startswith("dinov2") else "vision_tower.vision_model."
    assert any(k.startswith(prefix + "encoder.") for k in on_disk)  # the 4.x layout
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.vision_config.image_size == 16
    # SigLIP has no CLS token: Llava must keep every token ("full"); the others drop the CLS
    # (DINOv2's 4 registers stay, as in Llava's "default").
    assert model.config.vision_feature_select_strategy == ("full" if kind == "siglip" else "default")
    expected = {"siglip": 4, "clip": 4, "dinov2_with_registers": 4 + 4}[kind]
    assert tokens_per_image(cfg.vision) == expected

    images = torch.randn(2, 3, 16, 16)
    ours = VisionEncoder(cfg.vision)
    ours.model.load_state_dict(tower.state_dict())
    with torch.no_grad():
        # Llava's tower + feature selection + projector, per image.
        theirs = torch.stack(list(model.model.get_image_features(pixel_values=images).pooler_output))
        mine = model.model.multi_modal_projector(ours(images))
    assert (mine - theirs).abs().max() < 1e-5

    processor = transformers.AutoProcessor.from_pretrained(out)
    ids = processor(text="<image>", images=np.full((16, 16, 3), 128, dtype=np.uint8),
                    return_tensors="pt")["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == expected
