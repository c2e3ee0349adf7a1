"""Llama-3.x, Qwen2 and SigLIP2 backbones: HF folder -> our checkpoint -> our model at TP=1,
TP=2 and PP=2 -> exported Llava, logits against transformers' own models; tied embeddings
trained at PP=2; the refusals; a Qwen2 folder with its own tokenizer (no BOS) end to end.

Three tiny LLM folders built from transformers configs with random weights: a Llama-3.1-style
one (GQA, "llama3" RoPE scaling with original_max_position_embeddings=8 < the 24 test
positions, so every frequency band is scaled: the test fails if the scaling is ignored, which
test_llama3_rope_frequencies_match_transformers shows), the same tied (Llama-3.2-1B/3B), and a
Qwen2-style one (non-zero q/k/v biases, tied, rope_theta 1e6).
"""

import dataclasses
import io
import os

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_unihetero.hf import ConversionError, export_checkpoint, import_hf
from megatron_unihetero.testing import run_distributed_test

SEQ = 24
VOCAB = 400  # the HF models' rows; our checkpoints pad to 1024
LLM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
SOURCES = {  # name: (family, config overrides)
    "llama31": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama32_tied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2_tied": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                 tie_word_embeddings=True)),
}
SIGLIP2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               num_patches=16, patch_size=8)  # a 4 x 4 grid: 32 px natively


def hf_causal_lm(family, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**LLM, **overrides}))
    if family == "qwen2":  # transformers initialises biases to zero: make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.5)
    return model.eval()


def sample_tokens():
    tokens = torch.randint(10, 300, (1, SEQ), generator=torch.Generator().manual_seed(0))
    tokens[0, 0] = 1  # the tokenizer's BOS
    return tokens


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megatron_unihetero.data.preprocess.fixtures import save_tiny_dinov2, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("backbones")
    out = dict(root=root, tokenizer=train_tiny_tokenizer(str(root / "tok")),
               dinov2=save_tiny_dinov2(str(root / "dinov2")), logits={})
    for name, (family, overrides) in SOURCES.items():
        model = hf_causal_lm(family, **overrides)
        model.save_pretrained(str(root / name))
        with torch.no_grad():
            out["logits"][name] = model(sample_tokens()).logits
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def imported(sources):
    return {name: import_hf(sources[name], str(sources["root"] / f"ckpt_{name}"),
                            vision=sources["dinov2"], tokenizer=sources["tokenizer"])
            for name in SOURCES}


def model_config(ckpt):
    from megatron_unihetero import config_io
    from megatron_unihetero.models.config import ModelConfig

    with open(os.path.join(ckpt, "iter_0000000", "config.yaml")) as handle:
        return config_io.from_dict(ModelConfig, yaml.safe_load(handle)["model"])


def text_logits(model, tokens):
    """Our full-vocabulary logits [1, s, V] of a text-only row (this stage is first and last)."""
    from megatron.core import tensor_parallel

    hidden = model(tokens, torch.arange(tokens.shape[1])[None],
                   segment_ids=torch.zeros_like(tokens, dtype=torch.int32))
    return _gathered_logits(model, hidden, tensor_parallel)


def _gathered_logits(model, hidden, tensor_parallel):
    logits, _ = model.llm.output_layer(hidden)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits).transpose(0, 1)


def test_llama3_rope_frequencies_match_transformers():
    """Our llama3 inverse frequencies are transformers' (and differ from plain RoPE's in every
    band but the fastest at this original length, so the logit tests see the scaling)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_unihetero.models.llm import rope_inverse_frequencies

    theirs, factor = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**LLM, rope_parameters=LLAMA3_ROPE), "cpu")
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    ours = rope_inverse_frequencies(16, 5000.0, scaling)
    assert factor == 1.0 and torch.equal(ours, theirs)
    plain = rope_inverse_frequencies(16, 5000.0)
    assert (ours != plain).sum() == len(plain)  # the fastest band is smoothed, the rest divided


@pytest.mark.parametrize("name", list(SOURCES))
def test_import_matches_transformers_and_export_round_trips(sources, imported, tmp_path, name):
    """Our model (TP=1) and the exported Llava both give the source model's logits; the export's
    text config is the family's with its RoPE scaling and tie flag, and imports back to the
    same LLM config; a tied head is stored once."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration, Qwen2Config

    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt

    cfg = model_config(imported[name])
    family, overrides = SOURCES[name]
    assert (cfg.llm.family, cfg.llm.tie_word_embeddings, cfg.llm.vocab_size) == (
        family, overrides["tie_word_embeddings"], 1024)
    assert cfg.llm.rope_scaling == (None if family == "qwen2" else
                                    {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    dist_dir = dist_ckpt.dist_dir(os.path.join(imported[name], "iter_0000000"))
    stored = dist_ckpt.read_all_tensors(dist_dir)
    assert ("llm.output_layer.weight" in stored) != cfg.llm.tie_word_embeddings
    expected = sources["logits"][name]
    with parallel.single_process():
        model = parallel.build_model(cfg)
        dist_ckpt.load_model([model], dist_dir)
        model.eval()
        if cfg.llm.tie_word_embeddings:
            assert model.llm.output_layer.weight is model.llm.embedding.word_embeddings.weight
        if family == "qwen2":
            bias = model.llm.decoder.layers[0].self_attention.linear_qkv.bias
            assert bias.abs().min() > 0  # the biases, in megatron's fused per-group layout
            assert model.llm.decoder.layers[0].self_attention.linear_proj.bias is None
        with torch.no_grad():
            ours = text_logits(model, sample_tokens())
    assert (ours[..., :VOCAB] - expected).abs().max() < 1e-4

    out = export_checkpoint(imported[name], str(tmp_path / "hf"))
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    text_config = llava.config.text_config
    assert type(text_config) is {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    assert text_config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert text_config.rope_parameters == overrides["rope_parameters"]
    if overrides["tie_word_embeddings"]:
        assert llava.lm_head.weight.data_ptr() == llava.model.language_model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        exported = llava(input_ids=sample_tokens()).logits
    assert (exported[..., :VOCAB] - expected).abs().max() < 1e-4

    back = model_config(import_hf(out, str(tmp_path / "back")))
    assert back.llm == cfg.llm


def parallel_logits_job(ckpts, tp, pp, out_dir, grad_refs):
    """Each checkpoint loaded at (tp, pp): the full logits of the test row, written by the
    rank that ends the pipeline. At PP=2, for the tied checkpoints, one megatron-engine step:
    both copies of the tied weight get the PP=1 gradient (their all-reduce over the embedding
    group) and stay equal after the optimizer step."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt

    tokens = sample_tokens()
    positions = torch.arange(SEQ)[None]
    segments = torch.zeros_like(tokens, dtype=torch.int32)
    for name, ckpt in ckpts.items():
        cfg = model_config(ckpt)
        parallel.initialize(tp, pp, seed=99)
        model = parallel.build_model(cfg)
        dist_ckpt.load_model([model], dist_ckpt.dist_dir(os.path.join(ckpt, "iter_0000000")))
        model.eval()
        with torch.no_grad():
            if pp == 1:
                logits = text_logits(model, tokens)
            elif parallel_state.is_pipeline_first_stage():
                dist.send(model(tokens, positions, segment_ids=segments).contiguous(), dst=1)
            else:
                hidden = torch.empty(SEQ, 1, cfg.llm.hidden_size)
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
                logits = _gathered_logits(model, model(tokens, positions, segment_ids=segments),
                                          tensor_parallel)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(logits, os.path.join(out_dir, f"{name}_tp{tp}_pp{pp}.pt"))
        if pp == 2 and name in grad_refs:
            _tied_training_step(model, cfg, grad_refs[name])
        parallel.destroy()


def text_batches():
    tokens = sample_tokens().repeat(2, 1)
    tokens[1] = tokens[1].flip(0)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    return [dict(tokens=tokens, labels=labels, position_ids=torch.arange(SEQ).expand(2, SEQ),
                 segment_ids=torch.zeros_like(tokens, dtype=torch.int32))]


def _tied_training_step(model, cfg, ref_grad_path):
    from megatron.core import parallel_state

    from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    model.train()
    run = RunConfig(model=cfg, parallel=ParallelConfig(distributed_optimizer=True),
                    train=TrainConfig(lr=1e-2, warmup_steps=0, clip_grad=0.0, dtype="fp32"))
    engine = MegatronEngine(model, run)
    engine.train_step(text_batches(), {"text": 1.0})
    weight = model.shared_embedding_or_output_weight()
    expected = torch.load(ref_grad_path, weights_only=True)
    assert (weight.main_grad - expected).norm() <= 1e-5 * expected.norm()
    other = weight.detach().clone()
    dist.broadcast(other, src=0, group=parallel_state.get_embedding_group())
    assert torch.equal(other, weight.detach())  # the last stage's copy moved with the embedding


def tied_reference_grads(ckpts, root):
    """PP=1: the tied weight's gradient of the training step (its two uses summed by autograd)."""
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.training.step import forward_backward

    paths = {}
    for name, ckpt in ckpts.items():
        cfg = model_config(ckpt)
        if not cfg.llm.tie_word_embeddings:
            continue
        with parallel.single_process():
            model = parallel.build_model(cfg)
            dist_ckpt.load_model([model], dist_ckpt.dist_dir(os.path.join(ckpt, "iter_0000000")))
            forward_backward(model, text_batches(), weights={"text": 1.0}, image_token_id=cfg.image_token_id)
            paths[name] = str(root / f"{name}_grad.pt")
            torch.save(model.llm.embedding.word_embeddings.weight.grad, paths[name])
    return paths


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_logits_match_transformers_at_tp2_and_pp2(sources, imported, tmp_path, tp, pp):
    grad_refs = tied_reference_grads(imported, tmp_path) if pp == 2 else {}
    run_distributed_test(parallel_logits_job, 2, imported, tp, pp, str(tmp_path), grad_refs)
    for name in SOURCES:
        ours = torch.load(tmp_path / f"{name}_tp{tp}_pp{pp}.pt", weights_only=True)
        assert (ours[..., :VOCAB] - sources["logits"][name]).abs().max() < 1e-4, name


# -- SigLIP2 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(1)
    folder = str(tmp_path_factory.mktemp("siglip2") / "tower")
    Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2)).eval().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("image_size", [None, 16])
def test_siglip2_features_equal_transformers(siglip2_folder, image_size):
    """Our encoder on images [n, 3, S, S] = Siglip2VisionModel on its image processor's patches
    (its own convert_image_to_patches), at the native grid and at another size (16 px: 2 x 2
    patches, its position grid resized by transformers)."""
    from transformers import Siglip2VisionModel
    # The PIL backend's (the torchvision one's is the same code; torchvision is not installed).
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    from megatron_unihetero.models.config import VisionConfig
    from megatron_unihetero.models.vision import VisionEncoder, image_normalization, tokens_per_image

    config = VisionConfig(model_type="siglip2", path=siglip2_folder, image_size=image_size,
                          feature_layer=-2)
    ours = VisionEncoder(config)
    size = image_size or 32
    grid = size // 8
    assert ours.expected_image_shape == (3, size, size) and tokens_per_image(config) == grid * grid
    assert image_normalization(config) == ((0.5,) * 3, (0.5,) * 3)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    theirs = Siglip2VisionModel.from_pretrained(siglip2_folder).eval()
    with torch.no_grad():
        patches = torch.stack([torch.from_numpy(convert_image_to_patches(i.numpy(), 8)) for i in images])
        expected = theirs(pixel_values=patches,
                          pixel_attention_mask=torch.ones(2, grid * grid, dtype=torch.int32),
                          spatial_shapes=torch.tensor([[grid, grid]] * 2),
                          output_hidden_states=True).hidden_states[-2]
        mine = ours(images)
    assert mine.shape == (2, grid * grid, 32) and torch.equal(mine, expected)


def test_siglip2_exports_as_a_siglip_llava(sources, siglip2_folder, tmp_path):
    """A siglip2 checkpoint (run at 16 px: its 4 x 4 position grid resized to 2 x 2) exports as
    a Llava whose tower is a SiglipVisionModel at 16 px (hf/siglip2.py), giving our image
    features and our logits on a row with an image; the export re-imports as ``siglip``."""
    from megatron.core import tensor_parallel
    from transformers import AutoProcessor, LlavaForConditionalGeneration, SiglipVisionModel

    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt

    ckpt = import_hf(sources["llama31"], str(tmp_path / "ckpt"), vision=siglip2_folder,
                     tokenizer=sources["tokenizer"], image_size=16)
    cfg = model_config(ckpt)
    assert cfg.vision.model_type == "siglip2" and cfg.vision.path == os.path.abspath(siglip2_folder)
    tokens = sample_tokens()
    tokens[0, 3:7] = cfg.image_token_id  # 2 x 2 patches, no CLS
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with parallel.single_process():
        model = parallel.build_model(cfg)
        dist_ckpt.load_model([model], dist_ckpt.dist_dir(os.path.join(ckpt, "iter_0000000")))
        model.eval()
        with torch.no_grad():
            features = model.projector(model.vision(images))
            # The pooling head (unused by Llava, but exported): Siglip2's on its own inputs.
            pooled = model.vision.model(**model.vision._naflex_inputs(images)).pooler_output
            hidden = model(tokens, torch.arange(SEQ)[None], images=images,
                           segment_ids=torch.zeros_like(tokens, dtype=torch.int32))
            ours = _gathered_logits(model, hidden, tensor_parallel)

    out = export_checkpoint(ckpt, str(tmp_path / "hf"))
    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    llava.eval()
    assert type(llava.model.vision_tower) is SiglipVisionModel
    assert (llava.config.vision_config.model_type, llava.config.vision_config.image_size) == (
        "siglip_vision_model", 16)
    with torch.no_grad():
        theirs = llava.model.get_image_features(pixel_values=images).pooler_output[0]
        exported = llava(input_ids=tokens, pixel_values=images).logits
        their_pooled = llava.model.vision_tower(pixel_values=images).pooler_output
    assert (theirs - features[0]).abs().max() < 1e-4, (theirs - features[0]).abs().max()
    assert (their_pooled - pooled).abs().max() < 1e-4
    assert (exported - ours).abs().max() < 1e-4 and ours.abs().max() > 0.1
    image_processor = AutoProcessor.from_pretrained(out).image_processor
    assert image_processor.crop_size == {"height": 16, "width": 16}
    assert tuple(image_processor.image_mean) == tuple(image_processor.image_std) == (0.5,) * 3

    back = model_config(import_hf(out, str(tmp_path / "back")))
    assert back.vision.model_type == "siglip" and back.vision.hf_config["image_size"] == 16


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("change,fragments", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), ("rope_type='yarn'",)),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ("rope_type='linear'",)),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     ("'llama3' lacks", "low_freq_factor")),
    (dict(model_type="qwen2", use_sliding_window=True), ("use_sliding_window=true",)),
    (dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]),
     ("use_sliding_window", "[1]")),
    (dict(attention_bias=True), ("attention_bias=true",)),
    (dict(model_type="mistral"), ("model_type='mistral'",)),
])
def test_llm_config_refusals_name_the_field(change, fragments):
    from megatron_unihetero.hf.configs import llm_config_from_hf

    text = {**LLM, "model_type": "llama", **change}
    with pytest.raises(ConversionError) as info:
        llm_config_from_hf(text, "FOLDER")
    for fragment in ("FOLDER", *fragments):
        assert fragment in str(info.value), (fragment, str(info.value))


# -- a tokenizer without BOS (Qwen2's) ------------------------------------------------------
def pretrain_job(args):
    from megatron_unihetero.pretrain import main

    main(args)


def _qwen2_tokenizer(folder, texts):
    """Qwen2's kind of tokenizer.json: byte-level BPE, bos_token null, <|endoftext|> as eos and
    pad, <|im_start|> / <|im_end|> as added specials; trained here on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=None,
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def test_qwen2_tokenizer_without_bos_end_to_end(sources, tmp_path):
    """A Qwen2 folder with its own tokenizer (no BOS) -> import (the vocabulary grown for our
    specials; model.documents_start_with_bos false) -> shards without BOS (caption and qa rows)
    -> 2 training steps -> export: the processor has no BOS, the export's own check proved every
    calling path gives training's ids, the chat template gives exactly the shard's qa sample,
    and the Llava's logits are ours."""
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig

    from megatron_unihetero.data import conversation
    from megatron_unihetero.data.dataset import MultimodalDataset
    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.preprocess.readers import iter_texts
    from megatron_unihetero.data.shards import ShardReader
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.hf.rehearsal import logits_parity
    from megatron_unihetero.testing.tools import load_tool
    from megatron_unihetero.models.config import ConfigError, PixelGenConfig
    from megatron_unihetero.training import checkpoint as ckpt
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import check_tokenizer_matches

    write_demo_data(str(tmp_path / "demo"), 4, seed=3, image_size=24, valid_fraction=0.0)
    parquet = str(tmp_path / "demo" / "train.parquet")
    folder = str(tmp_path / "qwen2")
    rows = _qwen2_tokenizer(folder, iter_texts([parquet], ["caption", "question", "answer"]))
    hf_causal_lm("qwen2", vocab_size=rows, tie_word_embeddings=True).save_pretrained(folder)
    tok = build_tokenizer(folder)
    assert tok.bos_id is None and tok.bos_ids == [] and tok.eos_id == tok.pad_id == 0
    assert (tok.image_token_id, tok.vocab_size) == (rows, rows + 3)  # <pad> is <|endoftext|>

    init = import_hf(folder, str(tmp_path / "init"), vision=sources["dinov2"])  # its own tokenizer
    cfg = model_config(init)
    assert (cfg.image_token_id, cfg.llm.vocab_size, cfg.documents_start_with_bos) == (rows, 1024, False)

    prefix = str(tmp_path / "shards" / "train")
    assert load_tool("preprocess_data").main(
        ["--input", parquet, "--output-prefix", prefix, "--tokenizer-model", folder, "--template", "both",
         "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    reader = ShardReader(prefix + "_00000")
    assert reader.metadata["tokenizer"]["bos_id"] is None  # stored as null, read back as None
    img = [tok.image_start_id, tok.image_token_id, tok.image_end_id]
    caption, qa = reader.tokens(0).tolist(), reader.tokens(1).tolist()
    assert caption[:3] == img and qa[:3] == img and caption[-1] == qa[-1] == tok.eos_id
    # Condition dropout reads model.documents_start_with_bos: the trainer checks it against
    # the shards' tokenizer (here false, as the import set it).
    guided = dataclasses.replace(cfg, pixel=PixelGenConfig(cond_dropout=0.1, null_token_id=tok.pad_id))
    check_tokenizer_matches(RunConfig(model=guided), [MultimodalDataset(prefix)])
    with pytest.raises(ConfigError, match="without a BOS token.*documents_start_with_bos: false"):
        check_tokenizer_matches(RunConfig(model=dataclasses.replace(guided, documents_start_with_bos=True)),
                                [MultimodalDataset(prefix)])

    run_dir = str(tmp_path / "run")
    args = ["--config", os.path.join(init, "iter_0000000", "config.yaml"), f"--checkpoint.load={init}",
            f"--checkpoint.dir={run_dir}/ckpt", f"--logging.dir={run_dir}", f"--data.train=[{prefix}]",
            "--data.seq_length=64", "--data.micro_batch_size=2", "--data.num_workers=0",
            "--data.pack_window=64", "--train.steps=2", "--train.lr=1e-3", "--train.warmup_steps=1",
            "--train.dtype=fp32", "--checkpoint.save_interval=2", "--logging.log_interval=1",
            "--logging.eval_interval=0", "--logging.tensorboard=false", "--logging.progress_bar=false",
            "--model.llm.attention_impl=reference"]
    run_distributed_test(pretrain_job, 1, args, timeout_s=240)
    iter_dir = ckpt.latest_iteration_dir(f"{run_dir}/ckpt")
    assert iter_dir.endswith("iter_0000002")

    out = export_checkpoint(f"{run_dir}/ckpt", str(tmp_path / "hf"))  # checks the calling paths
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.bos_token is None
    assert GenerationConfig.from_pretrained(out).bos_token_id is None
    row = pq.read_table(parquet).to_pylist()[0]
    messages = conversation.qa_messages(None, row["question"], row["answer"])
    chat = processor.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert chat["input_ids"] == qa  # the shard's qa sample of the row, exactly
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    result = logits_parity(iter_dir, out, image, " " + row["caption"])
    assert result["num_image_tokens"] == 16 and result["max_abs_logit"] > 0.1
    assert result["max_abs_diff"] < 1e-4
    assert model_config(import_hf(out, str(tmp_path / "back"))).documents_start_with_bos is False


def test_tied_head_is_the_embedding_in_every_text_loss():
    """Every text-loss implementation (kernels/cross_entropy.py's and megatron's) reads the tied
    LM head as the embedding: the same loss, and the gradient reaches the embedding."""
    import torch.nn.functional as F

    from megatron_unihetero import parallel
    from megatron_unihetero.models.config import LLMConfig, ModelConfig
    from megatron_unihetero.models.heads import text_loss

    cfg = ModelConfig(llm=LLMConfig(num_layers=2, vocab_size=256, tie_word_embeddings=True))
    hidden = torch.randn(10, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    labels[2] = -100
    labels[labels == cfg.image_token_id] = 5  # the placeholder never counts
    with parallel.single_process():
        model = parallel.build_model(cfg)
        weight = model.llm.embedding.word_embeddings.weight
        keep = labels != -100
        expected_loss = F.cross_entropy(hidden[keep] @ weight.detach().t(), labels[keep], reduction="sum")
        for impl in ("reference", "fused", "megatron"):
            weight.grad = None
            loss, count = text_loss(model.llm.output_layer, hidden, labels, cfg.image_token_id, impl=impl)
            loss.backward()
            assert int(count) == int(keep.sum()) and torch.allclose(loss, expected_loss, rtol=1e-5), impl
            assert weight.grad is not None and weight.grad.abs().sum() > 0, impl


def test_llama3_style_tokenizer_json_grows_the_vocabulary_and_exports(sources, tmp_path):
    """A Llama-3-style tokenizer.json folder (BOS <|begin_of_text|> added by its post-processor,
    no pad token, as many tokens as the model has rows): the specials are appended past the
    model's rows (Llama-3: 128256 + 4, padded to 129024; here 400 + 4 -> 1024), and the export's
    processor gives one BOS on every calling path (checked by the export itself)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoProcessor, PreTrainedTokenizerFast

    folder = tmp_path / "llama3"
    shutil.copytree(sources["llama32_tied"], folder)
    words = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])

    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)
    ckpt = import_hf(str(folder), str(tmp_path / "ckpt"), vision=sources["dinov2"])
    cfg = model_config(ckpt)
    assert (cfg.image_token_id, cfg.llm.vocab_size, cfg.llm.tie_word_embeddings) == (VOCAB, 1024, True)
    out = export_checkpoint(ckpt, str(tmp_path / "hf"))
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "w5"}]}],
                                           add_generation_prompt=True)
    ids = processor.tokenizer(prompt)["input_ids"]
    assert ids[0] == 0 and 0 not in ids[1:]
