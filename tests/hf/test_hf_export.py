"""Checkpoint -> transformers Llava: logit parity at TP=1, TP=2 and PP=2, processor, generate.

Checkpoints are written with the real functions (parallel.build_model, checkpointing/dist.py's
save_weights, config_io.save_config) in spawned gloo jobs. The reference job (TP=1) also records
our model's logits and semantic-head output; the TP=2 / PP=2 jobs load the reference weights, so
the three exports must all reproduce the reference logits.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.testing.sharding import rank_layout

SEQ = 24
NUM_LAYERS = 2


def tiny_model_config(image_token_id, vocab_size, target="input_embedding", vision_type="dinov2"):
    from megatron_unihetero.models.config import LLMConfig, ModelConfig, SemanticGenConfig, VisionConfig

    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8)
    return ModelConfig(
        llm=LLMConfig(num_layers=NUM_LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=vocab_size, max_sequence_length=64,
                      rotary_base=5000.0, norm_epsilon=1e-6, attention_impl="reference"),
        vision=VisionConfig(model_type=vision_type, hf_config=hf, feature_layer=-2),
        semantic=SemanticGenConfig(weight=1.0, target=target, head="mlp"),
        image_token_id=image_token_id,
    )


def sample_inputs(image_token_id, tokens_per_image, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 300, (1, SEQ), generator=gen)
    tokens[0, 0] = 1  # BOS
    tokens[0, 3:3 + tokens_per_image] = image_token_id
    images = torch.randn(1, 3, 32, 32, generator=gen)
    return tokens, images


LAYOUTS = ((1, 1), (2, 1), (1, 2))


def write_checkpoint(model, cfg, ckpt, tokenizer, tp, pp):
    """Save like the trainer: DP rank 0 of every (TP, PP) coordinate writes its shard."""

    from megatron_unihetero import config_io
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.training.config import DataConfig, RunConfig

    iter_dir = os.path.join(ckpt, "iter_0000007")
    dist_ckpt.save_weights([model], iter_dir)
    if dist.get_rank() == 0:
        config_io.save_config(RunConfig(model=cfg, data=DataConfig(tokenizer=tokenizer)),
                              os.path.join(iter_dir, "config.yaml"))
        with open(os.path.join(ckpt, "latest"), "w") as handle:
            handle.write("iter_0000007\n")
    dist.barrier()


def save_all_job(root, cfg, tokenizer):
    """On 2 ranks: a TP=1 reference (records logits and semantic predictions), then the same
    weights at TP=2 and at PP=2; each layout is written as a checkpoint under ``root``."""
    from megatron_unihetero import parallel
    from megatron_unihetero.testing.sharding import shard_state_dict

    ref_path = os.path.join(root, "ref.pt")
    for tp, pp in LAYOUTS:
        parallel.initialize(tp, pp, seed=5)
        model = parallel.build_model(cfg)
        if (tp, pp) != (1, 1):
            ref = torch.load(ref_path, weights_only=True)
            local = shard_state_dict(ref["state"], model.state_dict().keys(), rank_layout(model))
            missing, unexpected = model.load_state_dict(local, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing)
            parallel.sync_semantic_targets(model, ema=False)
        elif dist.get_rank() == 0:
            model.eval()
            tokens, images = sample_inputs(cfg.image_token_id, model.tokens_per_image)
            position_ids = torch.arange(SEQ)[None]
            segment_ids = torch.zeros(1, SEQ, dtype=torch.int32)
            with torch.no_grad():
                hidden = model(tokens, position_ids, segment_ids=segment_ids, images=images)  # [s, b, h]
                logits, _ = model.llm.output_layer(hidden)
                semantic = model.semantic_head(hidden)
            torch.save({"state": model.state_dict(), "logits": logits.transpose(0, 1),
                        "semantic": semantic.transpose(0, 1), "tokens": tokens, "images": images,
                        "generation": our_generation(model, tokenizer)},
                       ref_path)
        write_checkpoint(model, cfg, os.path.join(root, f"ckpt_tp{tp}_pp{pp}"), tokenizer, tp, pp)
        parallel.destroy()


GEN_QUESTION = "where is the red circle?"
GEN_TOKENS = 12


def generation_image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8))


def our_generation(model, tokenizer_path):
    """Greedy generation on our model (generation/text.py, KV-cached) from the one template's
    prompt (eval/data.py builds it as the evaluation does): the prompt ids, the normalised
    image and the new ids, for the export's transformers generate to reproduce."""
    import io

    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.eval.data import build_generation_sets
    from megatron_unihetero.generation.text import SamplingParams, generate, never_generated

    tok = build_tokenizer(tokenizer_path)
    buffer = io.BytesIO()
    generation_image().save(buffer, format="PNG")
    row = {"image": buffer.getvalue(), "question": GEN_QUESTION, "answer": "unused"}
    (sample,) = build_generation_sets([row], tok, tokens_per_image=model.tokens_per_image, image_size=32)
    out = generate(model, sample.prompt.tokens, sample.prompt.images, eos_id=tok.eos_id,
                   params=SamplingParams(max_new_tokens=GEN_TOKENS),
                   suppress_ids=never_generated(tok, model.cfg.llm.vocab_size))
    return {"prompt": torch.tensor(sample.prompt.tokens), "images": sample.prompt.images,
            "new": torch.tensor(out.tokens)}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_path):
    """{(tp, pp): exported folder} plus the reference record."""
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.hf import export_checkpoint

    tok = build_tokenizer(tokenizer_path)
    cfg = tiny_model_config(tok.image_token_id, tok.vocab_size)
    root = tmp_path_factory.mktemp("export")
    run_distributed_test(save_all_job, 2, str(root), cfg, tokenizer_path)
    out = {(tp, pp): export_checkpoint(str(root / f"ckpt_tp{tp}_pp{pp}"), str(root / f"hf_tp{tp}_pp{pp}"))
           for tp, pp in LAYOUTS}
    return out, torch.load(str(root / "ref.pt"), weights_only=True), cfg


def _load_llava(folder):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info.get(key))
    return model.eval()


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_logits_match_our_model(exports, layout):
    folders, ref, _ = exports
    model = _load_llava(folders[layout])
    with torch.no_grad():
        logits = model(input_ids=ref["tokens"], pixel_values=ref["images"]).logits
    assert logits.shape == ref["logits"].shape
    err = (logits - ref["logits"]).abs().max().item()
    assert err < 1e-4, err
    assert ref["logits"].abs().max() > 0.1  # not trivially zero


def test_disk_layout_is_transformers_4x(exports):
    from safetensors import safe_open

    folders, _, _ = exports
    with safe_open(os.path.join(folders[(1, 1)], "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "language_model.lm_head.weight" in names
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in names
    assert "vision_tower.encoder.layer.0.attention.attention.query.weight" in names  # Dinov2 4.x
    assert "multi_modal_projector.linear_2.bias" in names
    assert not any(n.startswith("model.") for n in names)


def test_heads_predict_like_our_semantic_head(exports):
    from megatron_unihetero.hf.heads import load_unihetero_heads

    folders, ref, _ = exports
    model = _load_llava(folders[(1, 1)])
    heads = load_unihetero_heads(folders[(1, 1)])
    with torch.no_grad():
        hidden = model.model(input_ids=ref["tokens"], pixel_values=ref["images"]).last_hidden_state
        prediction = heads(hidden)
    assert (prediction - ref["semantic"]).abs().max().item() < 1e-4
    # PP=2 drops the last stage's projector mirror but keeps the semantic head.
    assert load_unihetero_heads(folders[(1, 2)]).semantic_head is not None


def test_processor_prepares_inputs_like_training(exports, tokenizer_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaProcessor

    from megatron_unihetero.data.image_transforms import ImageNormalizer
    from megatron_unihetero.data.preprocess.images import resize_center_crop
    from megatron_unihetero.data.tokenizer import build_tokenizer

    folders, _, cfg = exports
    processor = AutoProcessor.from_pretrained(folders[(1, 1)])
    assert isinstance(processor, LlavaProcessor)
    tok = build_tokenizer(tokenizer_path)
    # 40 x 60: the shorter side scales to 32 and the longer to exactly 48, so our resize and the
    # image processor's agree to the pixel (at non-integral sizes they may round 1 px apart).
    image = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    text = "<image_start><image><image_end> where is the red circle?"
    # A prompt written by hand starts with BOS itself (the chat template writes it; the tokenizer
    # adds none, so a rendered chat keeps exactly one).
    inputs = processor(text="<s>" + text, images=image, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    expected = [tok.bos_id]
    for piece in tok.encode(text):
        expected += [piece] * (16 if piece == tok.image_token_id else 1)  # 16 patch tokens
    assert ids == expected
    pixels = ImageNormalizer()(resize_center_crop(image, 32)[None])
    assert (inputs["pixel_values"] - pixels).abs().max() < 1e-5
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " hi"}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><image_start><image><image_end>Question:  hi"  # data/conversation.py


def _png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_calling_path_gives_the_training_ids(exports, tokenizer_path):
    """One BOS and exactly the ids preprocessing writes into a shard (samples.encode_document),
    whichever way the export is called: the rendered chat given to the processor or the
    tokenizer, or apply_chat_template(tokenize=True) of either; a LLaVA-style string content
    with <image> renders like the content list (image first, text stripped)."""
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_unihetero.data import conversation
    from megatron_unihetero.data.preprocess.samples import SampleConfig, encode_document
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.hf.processor import calling_paths

    folders, _, cfg = exports
    processor = AutoProcessor.from_pretrained(folders[(1, 1)])
    tok = build_tokenizer(tokenizer_path)
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))

    def chat(img):
        return [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "where is the red circle?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "at the top left"}]},
                {"role": "user", "content": [{"type": "text", "text": "and the square?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "none"}]}]

    shard = encode_document(conversation.render(chat(_png(image))), tok, SampleConfig(image_size=32)).tokens.tolist()
    expanded = []
    for i in shard:
        expanded += [i] * (16 if i == tok.image_token_id else 1)  # the loader's expansion
    paths = calling_paths(processor, chat(image), [image], add_generation_prompt=False)
    assert len(paths) == 4 and shard[:2] == [tok.bos_id, tok.image_start_id]
    for name, ids in paths.items():
        assert ids == (shard if name.startswith("tokenizer") else expanded), name

    llava = [{"role": "user", "content": "<image>\n where is the red circle? "},
             {"role": "assistant", "content": "at the top left"},
             {"role": "user", "content": "and the square?"}, {"role": "assistant", "content": "none"}]
    rendered = processor.apply_chat_template(llava, tokenize=False)
    assert rendered == processor.apply_chat_template(chat(image), tokenize=False)
    assert rendered == conversation.render_text(llava, "<s>", "</s>")
    assert processor(text=rendered, images=image)["input_ids"][0] == expanded
    assert processor.tokenizer.apply_chat_template(llava, tokenize=True, return_dict=True)["input_ids"] == shard
    two = [{"role": "user", "content": "<image> <image>\nsame?"}]  # lmms-eval's several images
    assert processor.apply_chat_template(two, tokenize=False, add_generation_prompt=True) == \
        "<s>" + conversation.IMAGE_PLACEHOLDER * 2 + "Question: same? Answer:"


def test_exported_files_are_readable_by_everyone(exports):
    import stat

    folders, _, _ = exports
    root = folders[(1, 1)]
    modes = {}
    for folder, dirs, files in os.walk(root):
        for name in [""] * (folder == root) + dirs + files:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    assert {"config.json", "model.safetensors", "tokenizer.json", "unihetero_heads.safetensors"} <= set(modes)
    bad = {p: oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(os.path.join(root, p)) else 0o644)}
    assert not bad, bad


def test_generate_runs(exports):
    folders, ref, cfg = exports
    model = _load_llava(folders[(2, 1)])
    out = model.generate(input_ids=ref["tokens"], pixel_values=ref["images"], max_new_tokens=4,
                         do_sample=False)
    assert out.shape == (1, SEQ + 4)
    # Greedy decoding's first new token is the argmax of our model's last logits.
    assert int(out[0, SEQ]) == int(ref["logits"][0, -1].argmax())


def test_generate_equals_our_greedy_generation(exports):
    """The export's transformers generate (greedy, its own KV cache) gives our model's greedy
    generation (generation/text.py, megatron-core's KV cache) token for token, from the prompt
    the processor's chat template writes with add_generation_prompt: the same ids as ours."""
    from transformers import AutoProcessor

    folders, ref, _ = exports
    ours = ref["generation"]
    processor = AutoProcessor.from_pretrained(folders[(1, 1)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": GEN_QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("Question: " + GEN_QUESTION + " Answer:")
    inputs = processor(text=text, images=generation_image(), return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ours["prompt"].tolist()
    assert (inputs["pixel_values"] - ours["images"]).abs().max() < 1e-5
    model = _load_llava(folders[(1, 1)])
    # as a user calls it: the export's generation_config.json suppresses what ours never generates
    out = model.generate(**inputs, max_new_tokens=GEN_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(ours["new"]) >= 4, ours["new"]
    assert new == ours["new"].tolist()


def test_bf16_export(exports, tmp_path):
    from megatron_unihetero.hf import export_checkpoint

    folders, ref, _ = exports
    ckpt = os.path.join(os.path.dirname(folders[(1, 1)]), "ckpt_tp1_pp1")
    out = export_checkpoint(ckpt, str(tmp_path / "bf16"), dtype="bf16", iteration=7)
    model = _load_llava(out)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_heads_file_with_pixel_head_and_ema_projector(tmp_path):
    """The heads loader rebuilds every head kind (pixel head, EMA target projector) exactly."""
    from megatron_unihetero.hf.heads import load_unihetero_heads, save_heads
    from megatron_unihetero.models.config import PixelGenConfig
    from megatron_unihetero.models.heads import SemanticHead
    from megatron_unihetero.models.pixel import PixelHead
    from megatron_unihetero.models.projector import Projector

    cfg = tiny_model_config(4, 400, target="ema_input_embedding")
    cfg.pixel = PixelGenConfig(weight=1.0, latent_source="batch", latent_channels=4, denoiser_width=32,
                               decoder_layers=1, decoder_heads=2)
    torch.manual_seed(0)
    parts = {"semantic_head": SemanticHead(64, 64, "mlp"), "target_projector": Projector(32, 64),
             "pixel_head": PixelHead(cfg.pixel, 64, 4)}
    state = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
    save_heads(str(tmp_path), state, cfg)
    heads = load_unihetero_heads(str(tmp_path))
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(heads(hidden), parts["semantic_head"](hidden))
        for name, tensor in heads.state_dict().items():
            assert torch.equal(tensor, state[name]), name
    assert heads.pixel_head.token_dim == 4
