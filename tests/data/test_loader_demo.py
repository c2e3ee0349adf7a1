"""The loader on shards written by the real preprocessing of the demo data (shapes world)."""

import pytest
import torch

from megatron_unihetero.data.demo_world import write_demo_data
from megatron_unihetero.data.loader import build_loader
from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.tokenizer import build_tokenizer

TPI, S = 16, 256


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_loader")
    tok_path = train_tiny_tokenizer(str(root))
    write_demo_data(str(root / "demo"), 300, seed=3, image_size=24, valid_fraction=0.0)
    cfg = PreprocessConfig(inputs=[str(root / "demo" / "train.parquet")], output_prefix=str(root / "both"),
                           tokenizer_model=tok_path, sample=SampleConfig(image_size=16, template="both"),
                           progress=False, chunk_size=32, shard_size_mb=0.2)
    summary = run_preprocess(cfg)
    return {"prefix": cfg.output_prefix, "tok": build_tokenizer(tok_path), "samples": summary["samples"]}


def test_demo_epoch_packs_densely_and_trains_answers_only(demo):
    tok = demo["tok"]
    loader = build_loader(demo["prefix"], seq_length=S, micro_batch_size=4, tokens_per_image=TPI,
                          num_samples=demo["samples"], pack_window=4096)
    docs = qa_docs = 0
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 16, 16)
        assert int((batch["tokens"] == tok.image_token_id).sum()) == TPI * batch["images"].shape[0]
        for b in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][b]
            for d in range(int(seg.max()) + 1):
                where = seg == d
                tokens, labels = batch["tokens"][b][where], batch["labels"][b][where]
                text = tok.decode([t for t in tokens.tolist() if t not in (tok.image_token_id, tok.image_start_id,
                                                                          tok.image_end_id, tok.bos_id, tok.eos_id)])
                targets = labels[labels != -100].tolist()
                assert targets[-1] == tok.eos_id  # the document ends with a trained EOS
                assert tok.image_token_id not in targets  # default mask: image tokens are not text targets
                if text.startswith("Question:"):
                    answer = tok.decode(targets[:-1]).strip()
                    assert text.endswith("Answer: " + answer) or text.endswith("Answer:" + answer), (text, answer)
                    qa_docs += 1
                else:
                    # every next token except <image_start>, the TPI expanded <image> tokens and <image_end>
                    assert len(targets) == int(where.sum()) - 1 - (TPI + 2)
                docs += 1
    assert docs == demo["samples"] and qa_docs == demo["samples"] // 2
    stats = loader.stats
    assert stats["rejected_samples"] == 0
    assert stats["efficiency"] >= 0.95, stats


def test_demo_resume_mid_epoch_on_two_ranks(demo):
    kw = dict(seq_length=S, micro_batch_size=2, tokens_per_image=TPI, pack_window=128, seed=11)
    for rank in range(2):
        full = list(zip(range(12), build_loader(demo["prefix"], dp_rank=rank, dp_size=2, **kw)))
        first = build_loader(demo["prefix"], dp_rank=rank, dp_size=2, **kw)
        for _ in range(5):
            next(first)
        resumed = build_loader(demo["prefix"], dp_rank=rank, dp_size=2, **kw)
        resumed.load_state_dict(first.state_dict())
        first.close()
        for (_, want), got in zip(full[5:], resumed):
            for key in ("tokens", "labels", "position_ids", "segment_ids", "images"):
                assert torch.equal(want[key], got[key]), key
        resumed.close()
