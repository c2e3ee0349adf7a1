"""Jobs for the staged-training tests (module-level so the forkserver workers can import them)."""

import contextlib
import json
import os

import torch
import torch.distributed as dist


def _submodule_states(chunks) -> dict:
    """{top-level submodule: {parameter name: a copy}} of this rank's chunks."""
    states: dict = {}
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            states.setdefault(name.split(".", 1)[0], {})[f"{index}.{name}"] = param.detach().clone()
    return states


def _adam_states(engine) -> list:
    """The torch Adam states of this rank's optimizer (megatron-core's parts, or the one inside
    DeepSpeed's ZeRO optimizer)."""
    from megatron_unihetero.training.optim import megatron_optimizers

    if engine.name == "megatron":
        inners = [opt.optimizer for opt in megatron_optimizers(engine.optimizer) if opt.optimizer is not None]
    else:
        inners = [engine.optimizer.optimizer]
    return [state for inner in inners for state in inner.state.values()]


def stage_job(args, out_dir: str, dump_start: bool = False):
    """Train one stage in this process and write, per rank, what it did to each submodule:
    ``out_dir/rank{R}.json`` with {submodule: "identical" | "moved"}, the Adam states' element
    count and step counts, this rank's trainable elements, and the param groups' tags and
    rates after the last step; with ``dump_start`` global rank 0 also saves the weights the
    run started from (after checkpoint.load) as ``out_dir/start.pt``."""
    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import Trainer

    cfg = load_config(RunConfig, None, args)
    cfg.validate(dist.get_world_size())
    parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        start = _submodule_states(trainer.chunks)
        if dump_start and dist.get_rank() == 0:
            torch.save({k: v for chunk in trainer.chunks for k, v in chunk.state_dict().items()
                        if torch.is_tensor(v)}, os.path.join(out_dir, "start.pt"))
        trainer.train()
        end = _submodule_states(trainer.chunks)
        states = _adam_states(trainer.engine)
        report = {
            "submodules": {sub: "identical" if all(torch.equal(t, end[sub][n]) for n, t in tensors.items())
                           else "moved" for sub, tensors in start.items()},
            "adam_numel": sum(s["exp_avg"].numel() for s in states),
            "adam_steps": sorted({float(s["step"]) for s in states}),
            "trainable_numel": sum(p.numel() for c in trainer.chunks for p in c.parameters() if p.requires_grad),
            "groups": [{k: group[k] for k in ("module", "decay", "lr", "weight_decay", "max_lr")}
                       for group in trainer.engine.lr_scheduler.optimizer.param_groups],
            "step": trainer.step,
        }
        with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
            json.dump(report, handle)
    finally:
        parallel.destroy()


def read_reports(out_dir: str) -> list:
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("rank") and n.endswith(".json"))
    reports = []
    for name in names:
        with open(os.path.join(out_dir, name)) as handle:
            reports.append(json.load(handle))
    return reports


def param_groups_job():
    """The param groups both engines build for one tiny model (PP=1, the LLM's embedding and
    output layer included): every trainable parameter in exactly the group of its module and
    decay, with that module's multipliers; frozen parameters in none."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_unihetero import parallel
    from megatron_unihetero.training.config import ModuleOptimConfig, ParallelConfig, RunConfig, TrainConfig
    from megatron_unihetero.training.optim import build_megatron_optimizer, megatron_optimizers, param_groups

    from tests.models import _parity_jobs as parity

    parallel.initialize(1, 1, seed=7)
    try:
        model_cfg = parity.tiny_config()  # semantic generation on: the semantic head trains
        train = TrainConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, module_lr={
            "projector": ModuleOptimConfig(lr_mult=10.0, wd_mult=0.0),
            "llm": ModuleOptimConfig(lr_mult=0.5, wd_mult=2.0),
            "heads": ModuleOptimConfig(lr_mult=3.0)})
        cfg = RunConfig(model=model_cfg, train=train,
                        parallel=ParallelConfig(distributed_optimizer=False))
        model = parallel.build_model(model_cfg)
        named = dict(model.named_parameters())
        assert not any(p.requires_grad for n, p in named.items() if n.startswith("vision.")), \
            "the tiny config's encoder is frozen"
        expected = {}
        for name, param in named.items():
            if param.requires_grad:
                module = {"semantic_head": "heads"}.get(name.split(".")[0], name.split(".")[0])
                decay = param.dim() > 1 and not name.endswith(".bias")
                expected[name] = (module, decay)
        assert {"llm.embedding.word_embeddings.weight", "llm.output_layer.weight"} <= set(expected)
        assert expected["llm.embedding.word_embeddings.weight"] == ("llm", True)

        def check(groups, name_of):
            seen = set()
            for group in groups:
                module, decay = group["module"], group["decay"]
                mults = train.module_multipliers(module)
                assert group["max_lr"] == train.lr * mults.lr_mult, group
                assert group["min_lr"] == train.min_lr * mults.lr_mult, group
                assert group["wd_mult"] == (mults.wd_mult if decay else 0.0), group
                for param in group["params"]:
                    name = name_of[param]
                    assert expected[name] == (module, decay), (name, module, decay)
                    seen.add(name)
            assert seen == set(expected), set(expected) ^ seen

        # DeepSpeed's groups: the model's own parameters.
        ds_groups = param_groups(model, train)
        check(ds_groups, {p: n for n, p in named.items()})
        order = [(g["decay"], g["module"]) for g in ds_groups]  # megatron-core's: by the tags
        assert order == sorted(order) and len(order) == 6, order  # llm, projector, heads x decay
        assert [g["weight_decay"] for g in ds_groups if g["module"] == "llm" and g["decay"]] == [0.1 * 2.0]

        # megatron-core's groups (the replicated optimizer: its groups hold the model's
        # parameters, in fp32); the same grouping.
        wrapped = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        optimizer = build_megatron_optimizer([wrapped], cfg, torch.float32)
        groups = [g for opt in megatron_optimizers(optimizer) for g in opt.optimizer.param_groups]
        check(groups, {p: n for n, p in named.items()})
        assert [(g["module"], g["decay"]) for g in groups] == [(g["module"], g["decay"]) for g in ds_groups]
    finally:
        parallel.destroy()


def text_only_micro_batch_job(engine_name: str, zero_stage: int = 1, text_only_last: bool = False):
    """A frozen LLM and a step whose first micro-batch has no image: that micro-batch's loss
    reaches no trainable parameter; the step still runs, and the projector learns from the
    other micro-batch."""
    import dataclasses

    from megatron_unihetero import parallel
    from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig
    from megatron_unihetero.training.engine import engine_class

    from tests.models import _parity_jobs as parity

    parallel.initialize(1, 1, seed=7)
    try:
        model_cfg = dataclasses.replace(parity.tiny_config(), freeze_llm=True,
                                        semantic=dataclasses.replace(parity.tiny_config().semantic, weight=0.0))
        cfg = RunConfig(model=model_cfg, parallel=ParallelConfig(engine=engine_name, zero_stage=zero_stage),
                        train=TrainConfig(lr=1e-3, warmup_steps=0, grad_accumulation=2, dtype="fp32"))
        model = parallel.build_model(model_cfg, params_dtype=engine_class(cfg).params_dtype(cfg))
        engine = engine_class(cfg)([model], cfg)
        text_only, with_images = parity.make_batches()
        text_only["tokens"][text_only["tokens"] == parity.IMAGE_TOKEN] = 10
        text_only["labels"][text_only["labels"] == parity.IMAGE_TOKEN] = 10
        del text_only["images"]
        before = [p.detach().clone() for p in model.projector.parameters()]
        batches = [with_images, text_only] if text_only_last else [text_only, with_images]
        result = engine.train_batch(batches, 0)
        assert not result.skipped, result
        assert any(not torch.equal(a, p) for a, p in zip(before, model.projector.parameters()))
        engine.close()
    finally:
        parallel.destroy()


@contextlib.contextmanager
def _megatron_core_standard_groups():
    """Build megatron optimizers as before per-module param groups: megatron-core's two standard
    groups (no config_overrides), untagged, with its default rates."""
    from megatron_unihetero.training import optim

    saved = optim.module_overrides, optim.apply_module_multipliers
    optim.module_overrides = lambda config, train: None
    optim.apply_module_multipliers = lambda groups, train: None
    try:
        yield
    finally:
        optim.module_overrides, optim.apply_module_multipliers = saved


def _train(args, legacy: bool = False):
    """Train a run in this process: ({name: parameter after training}, the param groups, the
    Adam steps)."""
    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import Trainer

    cfg = load_config(RunConfig, None, args)
    cfg.validate(dist.get_world_size())
    parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    try:
        with _megatron_core_standard_groups() if legacy else contextlib.nullcontext():
            trainer = Trainer(cfg)
        trainer.train()
        params = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(trainer.chunks)
                  for n, p in c.named_parameters()}
        groups = list(trainer.engine.optimizer.param_groups)
        return params, groups, {float(s["step"]) for s in _adam_states(trainer.engine)}
    finally:
        parallel.destroy()


def legacy_groups_resume_job(legacy_args, resume_args, resume_dir: str, refusal: str):
    """A megatron-engine run with megatron-core's standard param groups (as saved before
    per-module groups) trains 3 steps and checkpoints after step 2; a run with per-module groups
    resumes that checkpoint and trains step 3 (the projector at twice the rate): the same loss,
    bit-identical parameters but the projector's (every Adam moment restored), the same Adam
    step, each group tagged and at this run's rates. A resume of that run with the projector
    frozen is refused (its checkpoint's groups are other modules)."""
    import shutil

    from megatron_unihetero.testing.runs import train_records
    from megatron_unihetero.training import checkpoint as ckpt

    legacy_params, legacy_groups, legacy_steps = _train(legacy_args, legacy=True)
    assert len(legacy_groups) == 2 and not any("module" in g for g in legacy_groups)
    legacy_dir = _run_dir(legacy_args)
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(resume_dir, "ckpt"))
        shutil.copytree(os.path.join(legacy_dir, "ckpt", "iter_0000002"),
                        os.path.join(resume_dir, "ckpt", "iter_0000002"))
        ckpt.mark_latest(os.path.join(resume_dir, "ckpt"), os.path.join(resume_dir, "ckpt", "iter_0000002"))
    dist.barrier()
    params, groups, steps = _train(resume_args)
    assert sorted((g["module"], g["decay"]) for g in groups) == sorted(
        (module, decay) for module in ("heads", "llm", "projector") for decay in (True, False))
    assert all(g["max_lr"] == 2e-3 for g in groups if g["module"] == "projector"), groups
    assert steps == legacy_steps == {3.0}, (steps, legacy_steps)
    records = train_records(resume_dir)
    assert set(records) == {3}, records  # resumed after step 2
    record, legacy_record = records[3], train_records(legacy_dir)[3]
    assert record["loss"] == legacy_record["loss"]  # the data position and the weights
    assert record["lr/projector"] == 2 * record["lr"] == 2 * legacy_record["lr"]
    assert params.keys() == legacy_params.keys()
    for name, value in params.items():
        # the projector's rate is this run's (twice the legacy run's), every other module's
        # step is the legacy run's own: its Adam moments and step came back
        moved_alike = torch.equal(value, legacy_params[name])
        assert moved_alike != (".projector." in f".{name}"), name

    # The resumed run's checkpoint has per-module groups: a resume that trains other modules
    # (the projector frozen now) stays refused, with ``refusal`` in the message.
    from megatron_unihetero.checkpointing.errors import CheckpointError
    try:
        _train(resume_args + ["--model.projector.frozen=true", "--train.steps=4"])
    except CheckpointError as exc:
        assert refusal in str(exc), exc
    else:
        raise AssertionError("a checkpoint of other modules resumed")


def _run_dir(args) -> str:
    """The logging.dir of a run's --key=value arguments (its checkpoints are under ckpt/)."""
    return next(a.split("=", 1)[1] for a in args if a.startswith("--logging.dir="))
