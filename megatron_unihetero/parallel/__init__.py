"""Parallelism in one visible place: process groups, which stage builds what, and the syncs.

Model code (megatron_unihetero/models) reads as single-device code; this package decides the
tensor-parallel (TP) x pipeline-parallel (PP) x data-parallel (DP) grid, builds this rank's
pipeline stage (what the stage holds is its models/stage_plan.py plan), applies torch.compile
to its decoder layers when asked (:func:`apply_compile`), and keeps the last stage's
semantic-target projector in step with the first's.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_unihetero import platform
from megatron_unihetero.models.llm import transformer_config
from megatron_unihetero.models.stage_plan import EMA, StagePlan
from megatron_unihetero.models.unihetero import UniHeteroModel


def init_distributed(timeout_minutes: float = 30) -> None:
    """Join the process group torchrun / the deepspeed launcher set up in the environment."""
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        # A single process started without a launcher. Every launcher (torchrun, the deepspeed
        # launcher, and so our SLURM scripts) sets both RANK and MASTER_ADDR; either alone is
        # not a launcher (a MASTER_ADDR/PORT left in the shell). A world of one over an
        # in-memory store needs no port (a free port picked now could be taken by another
        # process before the bind: a race when many runs start on one machine). The environment
        # is left as it is: what DeepSpeed reads from it is lent by the DeepSpeed engine for its
        # lifetime only (deepspeed_mpu.launcher_environment).
        if os.environ.get("WORLD_SIZE", "1") != "1":
            missing = ", ".join(f"{k} is not set" for k in ("RANK", "MASTER_ADDR") if k not in os.environ)
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing}: start "
                               "multi-process runs with torchrun (examples/launch/)")
        if platform.has_cuda():
            torch.cuda.set_device(0)
        dist.init_process_group(platform.distributed_backend(), store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timeout)
        return
    if platform.has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = _torchrun_restart_store(timeout)
    if store is None:
        dist.init_process_group(platform.distributed_backend(), timeout=timeout)
    else:
        dist.init_process_group(platform.distributed_backend(), store=store, timeout=timeout,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _torchrun_restart_store(timeout: timedelta) -> Optional[dist.Store]:
    """The store of a torchrun restart (``--max-restarts``): torchrun's own store under a prefix
    of this try; None for a first try and for other launchers.

    torchrun (2.13, static and c10d rendezvous alike) keeps one TCPStore for every try of the
    worker group and hands it to the workers without a per-try prefix, so a restarted group
    would read the dead group's keys (gloo connects to addresses of processes that are gone:
    "connectFullMesh failed ... Connection refused"). The prefix torch once added itself
    (``/worker/attempt_N``) is added here."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/megatron_unihetero/restart_{restart}", store)


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, vpp: Optional[int] = None,
               timeout_minutes: float = 30) -> None:
    """Create megatron-core's TP/PP/DP groups over the running process group and seed RNGs.

    ``vpp``: virtual pipeline stages per rank (model chunks for the interleaved 1F1B schedule).
    ``timeout_minutes`` (``parallel.timeout_minutes``): how long any collective of any group
    (the world's and each of megatron's) waits before it fails instead of hanging.
    """
    platform.prepare_megatron()
    init_distributed(timeout_minutes)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    destroy()
    if vpp is not None and pp < 2:
        raise ValueError("virtual pipeline stages need pipeline_parallel >= 2")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp,
                                             distributed_timeout_minutes=timeout_minutes)
    # Same seed on every rank: weights are initialised on the CPU in full and then split
    # (TransformerConfig.use_cpu_initialization), so every TP/PP layout gets the same model.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _megatron_process_groups() -> list:
    """The process groups megatron-core created for this rank: its ``parallel_state`` lists
    each one it creates (``_global_process_group_list``, read by its own group-name lookup),
    once; None and the groups this rank is not in are left out."""
    created = parallel_state._global_process_group_list or []
    return [group for group in created
            if isinstance(group, dist.ProcessGroup) and group is not dist.GroupMember.WORLD]


def destroy() -> None:
    """Tear down megatron-core's TP/PP/DP groups; the world's process group stays.

    megatron-core's ``destroy_model_parallel`` only forgets its groups: torch keeps each one
    registered, with its gloo threads, until the world is destroyed. A process that builds
    the groups again over a world that stays (a tool run in a test process, evaluate and
    generate_image called in turn) would keep every earlier set (about 25 groups and 50
    threads each time), so they are destroyed here, one by one (a local operation, as
    megatron-core's own destroy of its gloo groups is)."""
    if not parallel_state.model_parallel_is_initialized():
        return
    # Before megatron-core's own teardown, which destroys a few of its gloo groups itself when
    # torch still has them (it then finds none) and forgets the list.
    for group in _megatron_process_groups():
        dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def single_process(seed: int = 1234):
    """A world of one (TP = PP = DP = 1) for tools that build the model outside a launcher
    (HF export and import, reading a checkpoint in full). A process group that was already
    running is kept; one started here is torn down after."""
    started = not dist.is_initialized()
    initialize(1, 1, seed)
    try:
        yield
    finally:
        destroy()
        if started:
            dist.destroy_process_group()


def build_model(model_config, params_dtype: torch.dtype = torch.float32, compile_layers: bool = False,
                memory: Optional[dict] = None):
    """This rank's pipeline stage of the UniHetero model, on this rank's device."""
    chunks = build_model_chunks(model_config, params_dtype, compile_layers, memory=memory)
    if len(chunks) != 1:
        raise ValueError("virtual pipeline stages are set: use build_model_chunks")
    return chunks[0]


def build_model_chunks(model_config, params_dtype: torch.dtype = torch.float32,
                       compile_layers: bool = False,
                       memory: Optional[dict] = None) -> List:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).
    ``compile_layers``: torch.compile each chunk's decoder layers (``train.compile``,
    :func:`apply_compile`). ``memory``: activation recompute and sequence parallelism as
    megatron-core's TransformerConfig fields (``RunConfig.activation_memory()``; None: neither).

    Chunk v of pipeline rank p holds layer block v * PP + p, so the first chunk of the first
    rank has the vision side and embeddings and the last chunk of the last rank has the heads.
    """
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    tconfig = transformer_config(
        model_config.llm,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=params_dtype, vpp_size=vpp, memory=memory,
    )
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        chunk = UniHeteroModel(
            model_config, tconfig,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        chunk.to(device=platform.device(), dtype=params_dtype)
        if compile_layers:
            apply_compile(chunk)
        chunks.append(chunk)
    sync_semantic_targets(chunks, ema=False)
    sync_tied_embeddings(chunks)
    return chunks


@torch.no_grad()
def sync_tied_embeddings(model) -> None:
    """A tied LM head (``llm.tie_word_embeddings``) at PP > 1: the last stage's copy takes the
    first stage's embedding (megatron-core's LanguageModule does this at build time too), over
    the embedding group. From then on the two stay equal: their gradients are all-reduced over
    that group before every optimizer step (training/engine_megatron.py). No-op otherwise."""
    chunks = _chunk_list(model)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if not chunks[0].cfg.llm.tie_word_embeddings or pp == 1:
        return
    first, last = chunks[0].plan.pre_process, chunks[-1].plan.post_process
    if not (first or last):
        return
    weight = chunks[0].llm.embedding.word_embeddings.weight if first else chunks[-1].llm.output_layer.weight
    dist.broadcast(weight.data, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                   group=parallel_state.get_embedding_group())


def apply_compile(model) -> None:
    """torch.compile each of the stage's decoder layers in place (torchtitan's apply_compile):
    megatron-core's TransformerLayer, compiled from outside, its parameters and state-dict
    names unchanged. The layers are alike, so dynamo compiles one and reuses its code for the
    others (it treats module parameters as inputs). Python decisions inside a layer (the
    attention layout is already built, once per forward, by the decoder) are graph breaks;
    the arithmetic around them fuses.
    """
    for layer in model.llm.decoder.layers:
        layer.compile()


def _chunk_list(model) -> List:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _vp_stages(chunks: List):
    """(virtual stage or None, chunk) for this rank's chunks."""
    return list(enumerate(chunks)) if len(chunks) > 1 else [(None, chunks[0])]


@torch.no_grad()
def sync_semantic_targets(model, ema: Optional[bool] = None) -> None:
    """Bring the last stage's ``target_projector`` up to date with the first stage's projector.

    Call after every optimizer step (and once after building/loading). A mirror
    (models/stage_plan.py: ``input_embedding`` targets at PP > 1) copies the projector; an EMA
    copy (``ema_input_embedding``) moves towards it: ema = decay * ema + (1 - decay) *
    projector. With ``ema=False`` an EMA copy is reset to the projector (initialisation).
    ``model`` is a stage or this rank's list of chunks (the projector is in the first, the copy
    in the last). At PP > 1 the first and last stage of a pipeline meet in megatron's embedding
    group; stages in between take no part.
    """
    chunks = _chunk_list(model)
    cfg = chunks[0].cfg
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # What the pipeline's last stage keeps; the first stage must know it too, to send.
    copy_kind = StagePlan.build(cfg, pre_process=pp == 1, post_process=True).target_projector
    first, last = chunks[0].plan.pre_process, chunks[-1].plan.post_process
    if copy_kind is None or not (first or last):
        return
    source = [p.detach().clone() for p in chunks[0].projector.parameters()] if first else None
    if pp > 1:
        group = parallel_state.get_embedding_group()
        src = parallel_state.get_pipeline_model_parallel_first_rank()
        if last:
            source = [torch.empty_like(p) for p in chunks[-1].target_projector.parameters()]
        for tensor in source:
            dist.broadcast(tensor, src=src, group=group)
    if not last:
        return
    decay = cfg.semantic.ema_decay if (copy_kind == EMA and ema is not False) else 0.0
    for target, value in zip(chunks[-1].target_projector.parameters(), source):
        target.mul_(decay).add_(value, alpha=1.0 - decay)
