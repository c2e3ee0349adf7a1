#!/usr/bin/env python
"""Ours against the peers, every figure a ratio measured in this run on the same data.

    python benchmarks/peers.py [--quick] [--only train,llava,data,preprocess,checkpoint]

Each row times our side and the peer's alternately (ours-peer, then peer-ours, ...), so a
shared machine's drifting load hits both alike, and reports the median over rounds of
(our cost / the peer's cost) in the same round, with the spread (min-max over rounds).
A ratio below 1 is ours cheaper; the target against megatron-core is at most 1.05.

Rows:

* train: our megatron engine's step (``MegatronEngine.train_batch``: training/engine_megatron.py
  through training/step.py, text only, TP = 1) against megatron-core's own ``GPTModel`` under
  its ``DistributedDataParallel``, ``get_megatron_optimizer`` (distributed optimizer),
  ``OptimizerParamScheduler``, ``finalize_model_grads`` and ``get_forward_backward_func``:
  the loop of Megatron-LM's pretrain_gpt.py (its loss_func: per-token loss sum and count).
  Same layer spec (models/llm.py ``block_spec``, handed to GPTModel, whose own RoPE is off: the
  spec's CoreAttention applies it from the tables given in ``packed_seq_params``, as our
  decoder passes them), same initial weights (copied), same tokens (one 512-token document),
  2 layers, world of one (gloo). Both sides run in this process, so megatron-core's CPU layer
  and fast paths (platform/) and torch's fused AdamW (training/optim.py
  ``use_fused_torch_adam``) apply to both: what is compared is the framework around the layers.
  The first step's losses and gradient norms of both sides are printed: they agree.
* llava: our engine on text + images (tiny config, semantic generation off) against the plain
  transformers ``LlavaForConditionalGeneration`` + AdamW loop of benchmarks/train_throughput.py.
* data: our loader (224 px JPEGs in encoded shards, data/loader.py, one loader worker) against
  megatron-energon's (the same JPEGs and captions as a webdataset, ``energon prepare``d, a
  ``CaptioningSample`` task encoder that decodes, normalises and batches, one worker):
  samples per CPU-second of all the processes doing the work (samples/s per core), counted
  from each loader's first batch on (its worker's start-up and imports left out). Ours also
  packs into 4096-token rows (the tokens are preprocessed); energon's decodes the captions
  as strings and does not tokenize.
* preprocess: our text preprocessing (tools/preprocess_data.py's pipeline, text-only
  documents) against Megatron-LM's tools/preprocess_data.py procedure (read from NVIDIA/
  Megatron-LM; its tools are not in the megatron-core wheel): a Pool of encoders
  (``json.loads``, tokenize, append EOD, ``pool.imap(..., 32)``) into megatron-core's
  ``IndexedDatasetBuilder``. Same jsonl, same SentencePiece model, 1 worker: samples per
  CPU-second of the processes.
* checkpoint: our save (CheckpointManager.save: megatron-core torch_dist of model and
  distributed optimizer, trainer.pt, manifest, ``latest``) and resume (CheckpointManager.load)
  against a plain ``torch.distributed.checkpoint`` save / load of the same model and Adam
  state (model state_dict and the inner torch optimizer's state_dict).

``--quick`` runs every row at small sizes (checks the script, not the figures).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

ROWS = []  # (section, name, ours, peer, unit, ratios) for the table


def summary(ratios):
    return statistics.median(ratios), min(ratios), max(ratios)


def record(section, name, ours, peer, unit, ratios, note=""):
    ROWS.append((section, name, ours, peer, unit, list(ratios), note))
    med, lo, hi = summary(ratios)
    print(f"  -> {name}: ours {ours:,.3g} {unit}, peer {peer:,.3g} {unit}; "
          f"cost ratio {med:.3f} [{lo:.3f}-{hi:.3f}] over {len(ratios)} rounds {note}", flush=True)


def record_rates(section, name, rates, unit, note=""):
    """A row of rates (higher is better): the cost ratio of a round is the peer's rate over ours."""
    ratios = [p / o for o, p in zip(rates["ours"], rates["peer"])]
    record(section, name, statistics.median(rates["ours"]), statistics.median(rates["peer"]), unit, ratios, note)


def alternate(ours, peer, rounds, warmup=1):
    """Seconds of each side per round, ours first in even rounds, the peer first in odd."""
    for _ in range(warmup):
        ours()
        peer()
    times = {"ours": [], "peer": []}
    for i in range(rounds):
        order = (("ours", ours), ("peer", peer)) if i % 2 == 0 else (("peer", peer), ("ours", ours))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


# -- training step: ours vs megatron-core's GPTModel ------------------------------------------
def text_config(hidden, dtype, seq, vocab, layers=2):
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.testing.runs import TINY_RUN
    from megatron_unihetero.training.config import RunConfig

    heads = max(hidden // 128, 2) if hidden > 1024 else max(hidden // 64, 2)
    ffn = {1024: 2816, 4096: 11008}.get(hidden, hidden * 8 // 3 // 16 * 16)
    settings = dict(TINY_RUN, **{
        "model.llm.num_layers": layers, "model.llm.hidden_size": hidden,
        "model.llm.num_attention_heads": heads, "model.llm.num_query_groups": heads,
        "model.llm.ffn_hidden_size": ffn, "model.llm.vocab_size": vocab,
        "model.llm.max_sequence_length": seq, "model.semantic.weight": 0.0,
        "data.seq_length": seq, "data.micro_batch_size": 1, "data.train": "[unused]",
        "train.dtype": dtype, "train.steps": 10000, "train.warmup_steps": 2, "train.clip_grad": 1.0})
    return load_config(RunConfig, None, [f"--{k}={v}" for k, v in settings.items()])


def text_batch(seq, vocab, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(16, vocab, (1, seq), generator=gen)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    return dict(tokens=tokens, labels=labels, position_ids=torch.arange(seq)[None],
                segment_ids=torch.zeros(1, seq, dtype=torch.int32), num_documents=1)


def approx_parameters(llm):
    layer = (llm.hidden_size * llm.head_dim * (llm.num_attention_heads + 2 * llm.num_query_groups)
             + llm.num_attention_heads * llm.head_dim * llm.hidden_size + 3 * llm.hidden_size * llm.ffn_hidden_size)
    return llm.num_layers * layer + 2 * llm.vocab_size * llm.hidden_size


def available_memory():
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


class OurStep:
    def __init__(self, cfg):
        from megatron_unihetero import parallel
        from megatron_unihetero.training.engine_megatron import MegatronEngine

        self.params_dtype = MegatronEngine.params_dtype(cfg)
        self.model = parallel.build_model(cfg.model, params_dtype=self.params_dtype)
        self.engine = MegatronEngine(self.model, cfg)
        self.step = 0

    def __call__(self, batch):
        result = self.engine.train_batch([batch], self.step)
        self.step += 1
        return result


class MegatronCoreStep:
    """Megatron-LM's pretrain_gpt.py step, on megatron-core's GPTModel with our layer spec."""

    def __init__(self, cfg, params_dtype, weights):
        import torch
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_unihetero.models import llm as llm_lib
        from megatron_unihetero.training.optim import use_fused_torch_adam

        llm, train = cfg.model.llm, cfg.train
        config = llm_lib.transformer_config(llm, params_dtype=params_dtype)
        config.finalize_model_grads_func = finalize_model_grads
        self.model = GPTModel(config, transformer_layer_spec=llm_lib.block_spec(llm, config),
                              vocab_size=llm.vocab_size, max_sequence_length=llm.max_sequence_length,
                              position_embedding_type="none", share_embeddings_and_output_weights=False)
        self.model.load_state_dict(weights, strict=True)
        self.rotary = llm_lib.RotaryEmbedding(llm.head_dim, llm.rotary_base)
        self.impl = llm.attention_impl
        self.params_dtype = params_dtype
        self.ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
            self.model)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=1e-8,
            clip_grad=train.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
            use_distributed_optimizer=True), [self.ddp])
        use_fused_torch_adam(self.optimizer)  # what ours runs (megatron-core's CPU default: for-loop)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
            lr_warmup_steps=train.warmup_steps, lr_decay_steps=train.steps, lr_decay_style="cosine",
            start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=train.steps,
            wd_incr_style="constant")
        self.forward_backward = get_forward_backward_func()
        self.seq = cfg.data.seq_length

    @staticmethod
    def loss_func(loss_mask, output_tensor):
        # pretrain_gpt.py's: the per-token loss sum, the token count, the report.
        import torch

        losses = output_tensor.view(-1).float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * loss_mask)
        num_tokens = loss_mask.sum().clone().detach().to(torch.int)
        report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
        return loss, num_tokens, {"lm loss": report}

    def forward_step(self, data_iterator, model):
        from megatron_unihetero.kernels.attention import attention_layout
        from megatron_unihetero.models.attention import AttentionInputs

        batch = next(data_iterator)
        layout = attention_layout(batch["segment_ids"], dtype=self.params_dtype,
                                  device=batch["tokens"].device, impl=self.impl)
        cos, sin = self.rotary(batch["position_ids"])
        loss_mask = batch["labels"] >= 0
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"].clamp(min=0),
                       packed_seq_params=AttentionInputs(layout=layout, cos=cos, sin=sin))
        return output, functools.partial(self.loss_func, loss_mask)

    def __call__(self, batch):
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=iter([batch]), model=[self.ddp],
            num_microbatches=1, seq_length=self.seq, micro_batch_size=1, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        report = reports[0]["lm loss"]
        return float(report[0] / report[1]), grad_norm


def train_rows(args):
    import torch

    sizes = ([(128, "fp32"), (128, "bf16")] if args.quick else
             [(h, d) for h in args.hidden for d in args.dtypes])
    seq = 64 if args.quick else args.seq
    vocab = 512 if args.quick else args.vocab
    rounds = 4 if args.quick else args.rounds
    for hidden, dtype in sizes:
        if (hidden, dtype) in args.skip:
            print(f"train hidden {hidden} {dtype}: skipped ({args.skip[(hidden, dtype)]})")
            continue
        cfg = text_config(hidden, dtype, seq, vocab)
        need = 2 * 24 * approx_parameters(cfg.model.llm)  # both sides: weights, grads, masters, Adam
        free = available_memory()
        if free is not None and need > 0.85 * free:
            print(f"train hidden {hidden} {dtype}: skipped: both sides need ~{need / 2**30:.0f} GiB, "
                  f"{free / 2**30:.0f} GiB available")
            args.skip[(hidden, dtype)] = "not enough memory"
            continue
        start = time.perf_counter()
        ours = OurStep(cfg)
        weights = {k[len("llm."):]: v.detach().clone() for k, v in ours.model.state_dict().items()
                   if k.startswith("llm.") and not k.endswith("_extra_state")}
        peer = MegatronCoreStep(cfg, ours.params_dtype, weights)
        del weights
        batch = text_batch(seq, vocab)
        first = ours(batch)
        peer_loss, peer_norm = peer(batch)
        params = sum(p.numel() for p in ours.model.llm.parameters())
        print(f"train, hidden {hidden}, {dtype}: {params / 1e6:.1f} M LLM parameters, built in "
              f"{time.perf_counter() - start:.0f} s; first step: loss {first.losses['loss']:.6f} / "
              f"{peer_loss:.6f}, grad norm {first.grad_norm:.6f} / {peer_norm:.6f} (ours / megatron-core)",
              flush=True)
        big = hidden >= 4096
        times = alternate(lambda: ours(batch), lambda: peer(batch), args.big_rounds if big else rounds,
                          warmup=0 if big else 1)
        ratios = [a / b for a, b in zip(times["ours"], times["peer"])]
        tokens = batch["tokens"].numel()
        record("train", f"step, hidden {hidden} x 2 layers, seq {seq}, {dtype}",
               tokens / statistics.median(times["ours"]), tokens / statistics.median(times["peer"]),
               "tokens/s", ratios, "(vs megatron-core GPTModel)")
        del ours, peer
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def llava_rows(args):
    import train_throughput as tt

    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.models.vision import load_hf_vision_config, tokens_per_image
    from megatron_unihetero.training.config import RunConfig

    overrides = ["--model.llm.attention_impl=auto"]
    if args.quick:
        overrides += ["--model.llm.num_layers=2", "--data.micro_batch_size=2"]
    cfg = load_config(RunConfig, os.path.join(REPO, "examples/configs/tiny_cpu.yaml"), overrides)
    vision = load_hf_vision_config(cfg.model.vision)
    ours, tokens = tt.ours_step(cfg, 0.0)
    peer, _ = tt.hf_step(cfg, tokens_per_image(cfg.model.vision), vision.image_size)
    times = alternate(ours, peer, 4 if args.quick else args.rounds * 2, warmup=2)
    ratios = [a / b for a, b in zip(times["ours"], times["peer"])]
    record("llava", f"step with images, tiny_cpu ({cfg.model.llm.num_layers} x {cfg.model.llm.hidden_size}, "
           f"{cfg.data.micro_batch_size} x {cfg.data.seq_length}), fp32",
           tokens / statistics.median(times["ours"]), tokens / statistics.median(times["peer"]),
           "tokens/s", ratios, "(vs transformers Llava + AdamW)")


# -- data: our loader vs megatron-energon's ----------------------------------------------------
class CpuMeter:
    """CPU seconds of this process and its descendants (loader workers) since :meth:`start`,
    sampled at every :meth:`tick` (a worker that exits between ticks keeps its last figure)."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.base, self.last = {}, {}

    def _read(self):
        import psutil

        seen = {}
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                times = proc.cpu_times()
                seen[proc.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return seen

    def start(self):
        self.base = self._read()
        self.last = dict(self.base)

    def tick(self):
        self.last.update(self._read())

    def seconds(self):
        self.tick()
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items())


def write_webdataset(path, records):
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, (jpeg, caption) in enumerate(records):
            for ext, data in (("jpg", jpeg), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def data_rows(args, root):
    import subprocess

    import numpy as np
    import torch
    from PIL import Image

    import data_throughput as dt
    from megatron_unihetero.data.dataset import MultimodalDataset
    from megatron_unihetero.data.loader import MultimodalLoader
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig
    from megatron_unihetero.data.shards import _indexed_dataset_module

    rows = 64 if args.quick else args.images
    rng = np.random.default_rng(0)
    records = []
    for i in range(rows):
        buf = io.BytesIO()
        Image.fromarray(dt.photo_like(rng, 224)).save(buf, format="JPEG", quality=90)
        records.append((buf.getvalue(), f"a photo of object {i} on a table, seen from the left side"))
    _indexed_dataset_module()
    tok = train_tiny_tokenizer(root)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = os.path.join(root, "images.parquet")
    pq.write_table(pa.Table.from_pylist([{"image": j, "caption": c} for j, c in records]), parquet)
    pre = PreprocessConfig(inputs=[parquet], output_prefix=os.path.join(root, "shards", "ds"), tokenizer_model=tok,
                           sample=SampleConfig(image_size=224), image_store="encoded", workers=1, progress=False)
    run_preprocess(pre)
    dataset = MultimodalDataset(pre.output_prefix)
    wds = os.path.join(root, "wds")
    os.makedirs(wds)
    write_webdataset(os.path.join(wds, "part-000000.tar"), records)
    proc = subprocess.run(["energon", "prepare", wds, "--non-interactive", "--split-ratio", "1,0,0",
                           "--sample-type", "CaptioningSample", "--field-map",
                           json.dumps({"image": "jpg", "caption": "txt"}), "--no-progress", "--num-workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"data: energon prepare failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return
    from megatron.energon import (CaptioningSample, DefaultTaskEncoder, WorkerConfig, get_loader,
                                  get_val_dataset)
    from megatron_unihetero.data.image_transforms import ImageNormalizer

    normalize = ImageNormalizer()

    class Encoder(DefaultTaskEncoder):
        """Energon's decoded image (float CHW in [0, 1], its torch decoder) -> our normalisation."""

        def encode_sample(self, sample: CaptioningSample) -> CaptioningSample:
            image = sample.image
            mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            sample.image = (image - mean) / std
            return sample

    batch = 8
    epochs = 1 if args.quick else 2

    def ours():
        loader = MultimodalLoader(dataset, seq_length=4096, micro_batch_size=1, tokens_per_image=256,
                                  num_samples=epochs * len(dataset), pack_window=512, prefetch=2,
                                  num_workers=1)
        samples, meter = 0, None
        for b in loader:  # counted from the first batch on: the worker's start-up left out
            if meter is None:
                meter = CpuMeter()
                meter.start()
                continue
            samples += b["num_documents"]
            meter.tick()
        spent = meter.seconds()
        loader.close()
        return samples, spent

    def energon():
        wc = WorkerConfig(rank=0, world_size=1, num_workers=1)
        ds = get_val_dataset(wds, split_part="train", batch_size=batch, worker_config=wc, task_encoder=Encoder())
        loader = get_loader(ds)
        samples, meter = 0, None
        for _ in range(epochs):
            for b in loader:
                if meter is None:
                    meter = CpuMeter()
                    meter.start()
                    continue
                samples += len(b.image)
                meter.tick()
        spent = meter.seconds()
        del loader, ds
        gc.collect()
        return samples, spent

    rates = {"ours": [], "peer": []}

    def timed(name, fn):
        def run():
            samples, spent = fn()
            rates[name].append(samples / spent)
        return run

    del normalize
    alternate(timed("ours", ours), timed("peer", energon), 2 if args.quick else args.data_rounds, warmup=0)
    record_rates("data", f"loader, 224 px JPEG, 1 worker, {rows} images x {epochs} epochs", rates,
                 "samples/CPU-s", "(vs megatron-energon)")


# -- preprocessing: text into .bin/.idx ------------------------------------------------------
class MegatronLMEncoder:
    """tools/preprocess_data.py's Encoder (NVIDIA/Megatron-LM, main): json.loads, tokenize each
    --json-keys field, append EOD, return (ids, lengths, bytes). Its tokenizer here: the same
    SentencePiece model our pipeline uses, through sentencepiece (Megatron-LM's
    SentencePieceTokenizer wraps the same call)."""

    def __init__(self, model_path):
        self.model_path = model_path

    def initializer(self):
        import sentencepiece

        MegatronLMEncoder.tokenizer = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        MegatronLMEncoder.eod = MegatronLMEncoder.tokenizer.eos_id()

    def encode(self, json_line):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in ("text",):
            doc_ids = MegatronLMEncoder.tokenizer.encode(data[key])  # one sentence: no --split-sentences
            doc_ids = doc_ids + [MegatronLMEncoder.eod]  # --append-eod
            ids[key], lens[key] = doc_ids, [len(doc_ids)]
        return ids, lens, len(json_line)


def megatron_lm_preprocess(jsonl, tokenizer, prefix, workers=1, vocab_size=512):
    """Partition.process_json_file's single-partition path: Pool(workers).imap(encode, fin, 32)
    into IndexedDatasetBuilder(bin, dtype=DType.optimal_dtype(vocab_size)), add_document per
    line, finalize(idx)."""
    import multiprocessing

    from megatron.core.datasets import indexed_dataset

    encoder = MegatronLMEncoder(tokenizer)
    with open(jsonl, encoding="utf-8") as fin, multiprocessing.get_context("fork").Pool(
            workers, initializer=encoder.initializer) as pool:
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            f"{prefix}_text_document.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size))
        count = 0
        for doc, sentence_lens, _ in encoded_docs:
            builder.add_document(doc["text"], sentence_lens["text"])
            count += 1
        builder.finalize(f"{prefix}_text_document.idx")
    return count


def preprocess_rows(args, root):

    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig
    from megatron_unihetero.data.shards import _indexed_dataset_module

    _indexed_dataset_module()
    tok = train_tiny_tokenizer(root)
    rows = 2000 if args.quick else args.text_rows
    words = ("the a photo of red blue circle square table tree sky left right above below small large "
             "object scene shows near far one two three").split()
    import random

    rnd = random.Random(0)
    jsonl = os.path.join(root, "text.jsonl")
    with open(jsonl, "w") as f:
        for i in range(rows):
            text = " ".join(rnd.choice(words) for _ in range(rnd.randint(40, 400)))
            # "text" for Megatron-LM's --json-keys text; the same text as our interleaved row
            f.write(json.dumps({"text": text, "segments": [{"text": text}]}) + "\n")
    counter = [0]

    def fresh(name):
        counter[0] += 1
        folder = os.path.join(root, f"{name}{counter[0]}")
        os.makedirs(folder)
        return folder


    def wall_and_cpu(fn):
        import resource

        def run():
            before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            n = fn()
            after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            spent = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
            return n, spent
        return run

    def ours():
        cfg = PreprocessConfig(inputs=[jsonl], input_format="jsonl",
                               output_prefix=os.path.join(fresh("ours"), "ds"), tokenizer_model=tok,
                               sample=SampleConfig(template="interleaved"), workers=1, progress=False)
        return run_preprocess(cfg)["samples"]

    def peer():
        return megatron_lm_preprocess(jsonl, tok, os.path.join(fresh("peer"), "ds"))

    rates = {"ours": [], "peer": []}

    def timed(name, fn):
        measured = wall_and_cpu(fn)

        def run():
            n, spent = measured()
            rates[name].append(n / spent)
        return run

    alternate(timed("ours", ours), timed("peer", peer), 2 if args.quick else args.data_rounds, warmup=0)
    record_rates("preprocess", f"text jsonl -> .bin/.idx, {rows} documents, 1 worker", rates, "docs/CPU-s",
                 "(vs Megatron-LM preprocess_data.py)")


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_rows(args, root):
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset
    from megatron_unihetero.testing.runs import run_overrides
    from megatron_unihetero.training import checkpoint as ckpt
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.optim import megatron_optimizers
    from megatron_unihetero.training.trainer import Trainer

    prefix = os.path.join(root, "synthetic")
    write_synthetic_dataset(prefix, num_samples=200, image_size=16, max_images=2, text_len=(4, 30))
    hidden = 64 if args.quick else args.ckpt_hidden
    run_dir = os.path.join(root, "run")
    extra = {"model.llm.hidden_size": hidden, "model.llm.num_layers": 2,
             "model.llm.ffn_hidden_size": hidden * 8 // 3 // 16 * 16, "model.llm.num_attention_heads": 4,
             "model.llm.vocab_size": 1024 if args.quick else 8192,
             "model.llm.max_sequence_length": 128, "data.seq_length": 128, "data.pack_window": 128,
             "train.steps": 1000, "checkpoint.save_interval": 0, "checkpoint.keep_last": 2,
             "logging.log_interval": 1000}
    cfg = load_config(RunConfig, None, run_overrides(prefix, run_dir, **extra))
    trainer = Trainer(cfg)
    trainer.engine.train_batch(trainer.next_batches(), trainer.step)
    trainer.step += 1
    engine = trainer.engine
    inner = [opt.optimizer for opt in megatron_optimizers(engine.optimizer)]

    def plain_state():
        return {"model": trainer.model.state_dict(),
                # the tensors (Adam's moments and steps); the param groups are the run's settings
                "optimizer": [opt.state_dict()["state"] for opt in inner]}

    plain_dir = os.path.join(root, "plain")
    counter = [0]
    save_t = {"ours": [], "peer": []}
    load_t = {"ours": [], "peer": []}

    def ours_save():
        trainer.step += 1
        start = time.perf_counter()
        trainer.save()
        save_t["ours"].append(time.perf_counter() - start)

    def peer_save():
        counter[0] += 1
        folder = os.path.join(plain_dir, str(counter[0]))
        start = time.perf_counter()
        dcp.save(plain_state(), checkpoint_id=folder)
        save_t["peer"].append(time.perf_counter() - start)

    def ours_load():
        manager = ckpt.CheckpointManager(trainer.cfg, log=lambda message: None)
        start = time.perf_counter()
        manager.load(engine, trainer.train_loader)
        load_t["ours"].append(time.perf_counter() - start)
        manager.release()

    def peer_load():
        folder = os.path.join(plain_dir, str(counter[0]))
        start = time.perf_counter()
        state = plain_state()
        dcp.load(state, checkpoint_id=folder)
        trainer.model.load_state_dict(state["model"])
        for opt, saved in zip(inner, state["optimizer"]):
            opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
        load_t["peer"].append(time.perf_counter() - start)

    trainer.checkpoints.release()
    rounds = 2 if args.quick else args.ckpt_rounds
    trainer.cfg.checkpoint.resume = True
    trainer.checkpoints = ckpt.CheckpointManager(trainer.cfg, log=lambda message: None)
    alternate(ours_save, peer_save, rounds, warmup=1)
    trainer.checkpoints.release()
    alternate(ours_load, peer_load, rounds, warmup=1)
    params = sum(p.numel() for p in trainer.model.parameters())
    for kind, times in (("save", save_t), ("resume", load_t)):
        n = len(times["peer"])
        ours_t, peer_t = times["ours"][-n:], times["peer"][-n:]
        record("checkpoint", f"{kind}, {params / 1e6:.1f} M parameters + Adam state, fp32",
               statistics.median(ours_t) * 1e3, statistics.median(peer_t) * 1e3, "ms",
               [a / b for a, b in zip(ours_t, peer_t)], "(vs plain torch.distributed.checkpoint)")
    trainer.checkpoints.close()


def print_table(args):
    import platform

    import torch

    print()
    print(f"peers ({'quick' if args.quick else 'full'} mode), {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("cost ratio = our cost / the peer's (time, or CPU-seconds per sample), median "
          "[min-max] over alternating rounds; < 1: ours cheaper")
    print(f"| {'row':<62} | {'ours':>12} | {'peer':>12} | {'unit':<13} | {'cost ratio':<22} | peer")
    print(f"|{'-' * 64}|{'-' * 14}|{'-' * 14}|{'-' * 15}|{'-' * 24}|------")
    for section, name, ours, peer, unit, ratios, note in ROWS:
        med, lo, hi = summary(ratios)
        print(f"| {name:<62} | {ours:12,.4g} | {peer:12,.4g} | {unit:<13} | "
              f"{med:5.3f} [{lo:.3f}-{hi:.3f}]{'':<5} | {note.strip('()')}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every row at small sizes (< ~2 minutes)")
    p.add_argument("--only", default="train,llava,data,preprocess,checkpoint")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds per training row")
    p.add_argument("--big-rounds", type=int, default=3, help="rounds for hidden 4096")
    p.add_argument("--skip-4096-bf16", action="store_true", default=True,
                   help="(default) hidden 4096 in bf16: see the docstring of main")
    p.add_argument("--with-4096-bf16", dest="skip_4096_bf16", action="store_false")
    p.add_argument("--images", type=int, default=256, help="224 px images for the data row")
    p.add_argument("--text-rows", type=int, default=20000, help="jsonl documents for the preprocess row")
    p.add_argument("--data-rounds", type=int, default=4)
    p.add_argument("--ckpt-hidden", type=int, default=512)
    p.add_argument("--ckpt-rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a shared machine's load disturbs one thread least)")
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Hidden 4096 in bf16 is skipped by default: megatron-core and ours both keep bf16
    weights with fp32 masters and gradients, and torch's CPU bf16 GEMMs take minutes a step
    there on 2 cores; ``--with-4096-bf16`` runs it."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    args.skip = {}
    if args.skip_4096_bf16:
        args.skip[(4096, "bf16")] = "impractical on this CPU, --with-4096-bf16 runs it"
    only = set(args.only.split(","))
    started = time.perf_counter()
    os.environ.setdefault("MASTER_PORT", "29541")
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        for name, fn, needs_root in (("train", train_rows, False), ("llava", llava_rows, False),
                                     ("data", data_rows, True), ("preprocess", preprocess_rows, True),
                                     ("checkpoint", checkpoint_rows, True)):
            if name not in only:
                continue
            t0 = time.perf_counter()
            if needs_root:
                folder = os.path.join(root, name)
                os.makedirs(folder, exist_ok=True)
                fn(args, folder)
            else:
                fn(args)
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print_table(args)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
