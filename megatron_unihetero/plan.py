"""Memory planner: ``python -m megatron_unihetero.plan --config RUN.yaml [--gpu-memory-gb 80]
[--world-size N] [--images-per-sample K] [--section.key=value ...]``.

Prints, for each pipeline rank of the config's layout (every TP and DP rank of a pipeline rank
holds the same amounts): parameters, gradients, optimizer state, activations at the config's
micro-batch and sequence length (without recompute, and with the config's ``train.recompute``),
and whether the total fits in the GPU's memory.

How one rank's parameters are counted without a world of TP x PP x DP processes: each kind of
pipeline stage (first, middle, last; one stage at PP = 1) is built on the meta device in a
world of one, with its ``pre_process`` / ``post_process`` and the layers of one pipeline rank,
and each parameter is then divided by the TP size where megatron-core marked it
tensor-parallel (``param.tensor_model_parallel``: its column/row-parallel linears and the
vocab-parallel embedding set the mark at any TP size; everything else is replicated over TP).
That reads the sharding from megatron-core's own marks instead of restating its rules, and
needs no mocked ``parallel_state`` (whose process groups megatron-core's layers query while
they are built).

Bytes per parameter: weights in the run's dtype (bf16: 2, fp32: 4, frozen ones too); fp32 main
gradients (4, megatron-core's DDP with ``grad_reduce_in_fp32``) and Adam state (fp32 master
weights when the weights are bf16, and the two moments: 12 or 8) for trainable parameters,
the Adam state divided by DP with the distributed optimizer (DeepSpeed: by its ZeRO stage).

Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4) per layer, s x b x h x (34 + 5 a s / h) bytes in 16-bit, adapted to this
model: no dropout masks, RMSNorm, grouped-query attention, SwiGLU (its gate, up, silu(gate)
and their product, where a GeLU MLP keeps two f-wide tensors), and a flash/SDPA core attention
that keeps its output and log-sum-exp instead of the a x s x s scores. Per layer, in 16-bit
bytes, with t the TP size:

    replicated over TP (split by t with sequence parallelism): 8 s b h
        (the two norms' inputs, the QKV and fc1 linears' inputs)
    split by t: s b (6 h + 6 g d + 8 f + 4 a)
        (the fused QKV output 2h + 4gd, kept whole because v is a view of it; q and k rotated
        out of place 2h + 2gd; the attention output 2h; SwiGLU's four f-wide tensors 8f; the
        fp32 log-sum-exp 4a)

Selective recompute drops what the core attention saves inside the checkpoint (the rotated q
and k, the log-sum-exp; q, k, v stay as its inputs), ``mlp`` also SwiGLU's 8f. Full
recompute keeps each checkpointed chunk's input (2 s b h, /t with sequence parallelism) and
rebuilds one chunk's activations at a time in the backward. A pipeline rank keeps the
activations of the micro-batches in flight under megatron's schedules: one without pipelining,
min(PP - r, micro-batches) on rank r under 1F1B, the interleaved schedule's warm-up plus one
chunk with virtual stages. The first stage adds the vision side per micro-batch (the frozen
encoder's hidden states while it runs, or its activations by the same formula when it trains,
and the projector's inputs), the last stage the final norm, the LM head's fused loss (the
hidden-state and weight gradients it keeps for the backward, or fp32 logits with the
``megatron`` / ``reference`` loss), the semantic head's input and, at PP > 1, its own encoder
run. Not modelled: the pixel head's activations, allocator fragmentation, communication
buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from megatron.core import tensor_parallel

from megatron_unihetero import parallel
from megatron_unihetero.config_io import ConfigLoadError, load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.models.llm import transformer_config
from megatron_unihetero.models.unihetero import UniHeteroModel
from megatron_unihetero.models.vision import load_hf_vision_config, tokens_per_image
from megatron_unihetero.training.config import RunConfig, resolve_dtype

GB = 1024 ** 3


@dataclass
class RankPlan:
    """One pipeline rank's memory, in bytes (parameter counts as numbers)."""

    name: str
    params: int = 0  # parameters this rank holds
    trainable: int = 0
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: Dict[str, float] = field(default_factory=dict)  # recompute setting -> bytes

    def total(self, recompute: str) -> float:
        return self.weights + self.grads + self.optimizer + self.activations[recompute]


def _dtype_bytes(cfg: RunConfig) -> int:
    return 2 if resolve_dtype(cfg.train.dtype) == "bf16" else 4


def _stage_kinds(pp: int) -> List[tuple]:
    """(name, pre_process, post_process, pipeline rank) of each kind of stage."""
    if pp == 1:
        return [("rank 0 (the whole model)", True, True, 0)]
    kinds = [("rank 0 (first stage)", True, False, 0)]
    if pp > 2:
        kinds.append((f"ranks 1-{pp - 2} (middle stages)", False, False, 1))
    kinds.append((f"rank {pp - 1} (last stage)", False, True, pp - 1))
    return kinds


def count_parameters(cfg: RunConfig, pre_process: bool, post_process: bool) -> tuple:
    """(parameters, trainable parameters) one TP rank of this kind of stage holds."""
    par = cfg.parallel
    # The local layer spec: it builds on any machine, and TransformerEngine's layers hold the
    # same parameters (fused into fewer modules).
    llm = dataclasses.replace(cfg.model.llm, num_layers=cfg.model.llm.num_layers // par.pipeline_parallel,
                              transformer_impl="local")
    tconfig = transformer_config(llm)  # TP = PP = 1: the layers of one pipeline rank, unsplit
    with torch.device("meta"):
        stage = UniHeteroModel(dataclasses.replace(cfg.model, llm=llm), tconfig,
                               pre_process=pre_process, post_process=post_process)
    total = trainable = 0
    for param in stage.parameters():
        # megatron-core's own defaults for what its layers did not mark (replicated over TP).
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        numel = param.numel() // par.tensor_parallel if param.tensor_model_parallel else param.numel()
        total += numel
        trainable += numel if param.requires_grad else 0
    return total, trainable


def _in_flight(cfg: RunConfig, rank: int) -> float:
    """Micro-batches (of one chunk's layers, as a fraction of the rank's layers) in flight."""
    pp, vpp, micro = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline, cfg.train.grad_accumulation
    if pp == 1:
        return 1.0
    if vpp is None:
        return float(min(pp - rank, micro))
    # megatron's interleaved schedule: warm-up chunk-micro-batches plus the one in flight.
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, micro * vpp)
    return (warmup + 1) / vpp


def layer_activation_bytes(cfg: RunConfig, recompute: str) -> tuple:
    """(bytes one layer keeps for one micro-batch, bytes of a checkpointed chunk's input) on
    one TP rank, in the run's activation dtype (see the module docstring)."""
    llm, par = cfg.model.llm, cfg.parallel
    s, b, h, f = cfg.data.seq_length, cfg.data.micro_batch_size, llm.hidden_size, llm.ffn_hidden_size
    a, g, d, t = llm.num_attention_heads, llm.num_query_groups, llm.head_dim, par.tensor_parallel
    sp = par.sequence_parallel and t > 1
    scale = _dtype_bytes(cfg) / 2  # the formula's bytes are 16-bit ones
    replicated = 8 * h / (t if sp else 1)
    split = 6 * h + 6 * g * d + 8 * f + 4 * a
    if recompute == "selective":
        split -= 2 * h + 2 * g * d + 4 * a  # the rotated q and k, the log-sum-exp
        if "mlp" in cfg.train.recompute_modules:
            split -= 8 * f
    layer = s * b * (replicated + split / t) * scale
    chunk_input = s * b * 2 * h / (t if sp else 1) * scale
    return layer, chunk_input


def stage_activation_bytes(cfg: RunConfig, rank: int, pre_process: bool, post_process: bool,
                           recompute: str, images_per_sample: int) -> float:
    """Activations one TP rank of pipeline rank ``rank`` holds at its peak."""
    par, llm, train = cfg.parallel, cfg.model.llm, cfg.train
    layers = llm.num_layers // par.pipeline_parallel
    layer, chunk_input = layer_activation_bytes(cfg, recompute)
    if recompute == "full":
        n = train.recompute_num_layers
        if train.recompute_method == "uniform":
            kept, transient = (layers / n) * chunk_input, n * layer
        else:  # block: the first n layers of the stage are recomputed, the others keep theirs
            kept, transient = n * chunk_input + (layers - n) * layer, layer
    else:
        kept, transient = layers * layer, 0.0
    in_flight = _in_flight(cfg, rank)
    total = in_flight * kept + transient

    scale = _dtype_bytes(cfg) / 2
    s, b, h, t = cfg.data.seq_length, cfg.data.micro_batch_size, llm.hidden_size, par.tensor_parallel
    vision = load_hf_vision_config(cfg.model.vision)
    image_tokens = tokens_per_image(cfg.model.vision)
    encoder_tokens = image_tokens + int(cfg.model.vision.model_type != "siglip" and cfg.model.vision.drop_cls_token)
    n_images = images_per_sample * b
    d_enc = vision.hidden_size
    encoder_states = n_images * encoder_tokens * d_enc * 2 * scale  # one hidden state, 16-bit bytes
    if cfg.model.vision.frozen:
        # No graph: while it runs it holds all its hidden states (output_hidden_states).
        encoder_kept, encoder_transient = encoder_states, (vision.num_hidden_layers + 1) * encoder_states
    else:
        dinov2 = cfg.model.vision.model_type in ("dinov2", "dinov2_with_registers")
        f_enc = int(d_enc * vision.mlp_ratio) if dinov2 else vision.intermediate_size
        per_layer = n_images * encoder_tokens * (16 * d_enc + 4 * f_enc + 4 * vision.num_attention_heads) * scale
        encoder_kept, encoder_transient = vision.num_hidden_layers * per_layer, 0.0
    if pre_process:
        projector = 0.0 if cfg.model.projector.frozen else n_images * image_tokens * 2 * (d_enc + 2 * h) * scale
        total += in_flight * (encoder_kept + projector) + encoder_transient
    if post_process:
        tokens = s * b
        head = tokens * 2 * h * scale  # the final norm's input (the whole sequence, gathered)
        if llm.loss_impl in ("megatron", "reference"):
            head += 8.0 * tokens * llm.vocab_size / t  # fp32 logits and their softmax
        else:  # the fused loss keeps its hidden-state and weight gradients for the backward
            head += (tokens * h + llm.vocab_size // t * h) * 2 * scale
        if cfg.model.semantic.enabled:
            head += n_images * image_tokens * 2 * h * scale
            if not pre_process:  # the last stage's own encoder run (forward only)
                head += encoder_states
                total += (vision.num_hidden_layers + 1) * encoder_states
        total += head
    return total


def plan(cfg: RunConfig, world_size: int, images_per_sample: Optional[int] = None) -> List[RankPlan]:
    """Every kind of pipeline rank's memory at the config's layout (see the module docstring)."""
    par = cfg.parallel
    dp = world_size // (par.tensor_parallel * par.pipeline_parallel)
    if images_per_sample is None:
        images_per_sample = cfg.data.seq_length // tokens_per_image(cfg.model.vision)
    width = _dtype_bytes(cfg)
    adam = 8 + (4 if width == 2 else 0)  # m and v, and fp32 masters for 16-bit weights
    settings = ["none"] + ([cfg.train.recompute] if cfg.train.recompute != "none" else [])
    plans = []
    for name, pre, post, rank in _stage_kinds(par.pipeline_parallel):
        params, trainable = count_parameters(cfg, pre, post)
        # What is divided over DP: megatron's distributed optimizer (ZeRO-1) shards the Adam
        # state; DeepSpeed's ZeRO stage 1 / 2 / 3 also the state / gradients / weights.
        if par.engine == "megatron":
            shard = dict(optimizer=dp if par.distributed_optimizer else 1, grads=1, weights=1)
        else:
            stage = par.zero_stage
            shard = dict(optimizer=dp if stage >= 1 else 1, grads=dp if stage >= 2 else 1,
                         weights=dp if stage >= 3 else 1)
        plans.append(RankPlan(
            name=name, params=params, trainable=trainable, weights=params * width / shard["weights"],
            grads=trainable * 4.0 / shard["grads"], optimizer=trainable * adam / shard["optimizer"],
            activations={r: stage_activation_bytes(cfg, rank, pre, post, r, images_per_sample)
                         for r in settings}))
    return plans


def report(cfg: RunConfig, plans: List[RankPlan], world_size: int, gpu_memory_gb: float,
           images_per_sample: int) -> str:
    par = cfg.parallel
    dp = world_size // (par.tensor_parallel * par.pipeline_parallel)
    sp = "on" if par.sequence_parallel and par.tensor_parallel > 1 else "off"
    recompute = cfg.train.recompute
    lines = [
        f"layout: TP {par.tensor_parallel} x PP {par.pipeline_parallel} x DP {dp} = {world_size} GPUs; "
        f"micro-batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_length}, "
        f"{cfg.train.grad_accumulation} micro-batches per step, {images_per_sample} images per sample; "
        f"sequence parallel {sp}; distributed optimizer "
        f"{'on' if par.distributed_optimizer else 'off'}; {_dtype_bytes(cfg) * 8}-bit weights",
    ]
    for p in plans:
        lines.append(f"{p.name}, per GPU:")
        lines.append(f"  parameters   {p.params / 1e9:8.3f} B ({p.trainable / 1e9:.3f} B trainable)")
        lines.append(f"  weights      {p.weights / GB:8.2f} GB")
        lines.append(f"  gradients    {p.grads / GB:8.2f} GB")
        lines.append(f"  optimizer    {p.optimizer / GB:8.2f} GB")
        for setting, value in p.activations.items():
            label = "no" if setting == "none" else setting
            lines.append(f"  activations, {label} recompute: {value / GB:8.2f} GB -> total "
                         f"{p.total(setting) / GB:7.2f} GB")
        total = p.total(recompute)
        verdict = "fits" if total <= gpu_memory_gb * GB else "does NOT fit"
        lines.append(f"  with train.recompute={recompute}: {total / GB:.2f} GB of {gpu_memory_gb:g} GB: {verdict}"
                     f" ({(gpu_memory_gb * GB - total) / GB:+.2f} GB)")
    return "\n".join(lines)


def main(argv=None) -> List[RankPlan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in the run (default: TP x PP, one data-parallel rank)")
    parser.add_argument("--images-per-sample", type=int, default=None,
                        help="images in one packed row (default: as many as fit, seq // tokens per image)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        par = cfg.parallel
        world = args.world_size or par.tensor_parallel * par.pipeline_parallel
        if world % (par.tensor_parallel * par.pipeline_parallel):
            raise ConfigError(f"--world-size {world} is not a multiple of parallel.tensor_parallel x "
                              f"parallel.pipeline_parallel = {par.tensor_parallel} x {par.pipeline_parallel}")
        load_hf_vision_config(cfg.model.vision)
    except ConfigError as exc:
        hint = (" (the planner needs the encoder's HF config: point model.vision.path at its local "
                "folder, or give --model.vision.path=null --model.vision.hf_config={...})"
                if "vision.path" in str(exc) else "")
        print(f"config error: {exc}{hint}", file=sys.stderr)
        raise SystemExit(2)
    except ConfigLoadError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    images = args.images_per_sample
    if images is None:
        images = cfg.data.seq_length // tokens_per_image(cfg.model.vision)
    with parallel.single_process():  # megatron-core's layers need parallel_state to be built
        plans = plan(cfg, world, images)
    print(report(cfg, plans, world, args.gpu_memory_gb, images))
    return plans


if __name__ == "__main__":
    main()
