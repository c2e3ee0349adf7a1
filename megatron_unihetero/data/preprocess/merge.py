"""Merge shards into one shard (tools/merge_shards.py).

The data files are concatenated with ``IndexedDatasetBuilder.add_index`` (a byte copy plus the
index arrays), so merging never decodes samples, except for writing default loss masks of
shards without one when others have one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

from megatron_unihetero.data.shards import ShardReader, ShardWriter, list_shards

# Metadata that must agree between merged shards (else the merged shard would lie).
_MUST_MATCH = ("image_store", "image_size", "feature_shape", "feature_dtype")
# Copied from the first shard into the merged one (describe how the samples were made).
_KEEP = ("tokenizer", "sample_config", "image_encoding", "vision_model", "vision_model_type", "feature_source")


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Each input is a shard prefix or a dataset prefix (all its shards, in order)."""
    out: List[str] = []
    for p in inputs:
        shards = list_shards(p)
        if not shards:
            raise FileNotFoundError(f"no finished shard found for {p!r} (looked for {p}.json and {p}_NNNNN.json)")
        out.extend(shards)
    return out


def part_inputs(prefix: str, num_parts: int) -> List[str]:
    """The dataset prefixes of the ``num_parts`` jobs of a split run (``--num-shards``), in order.

    Every part must have finished: its summary is written last, after its shards.
    """
    from megatron_unihetero.data.preprocess.pipeline import part_prefix

    parts = [part_prefix(prefix, i, num_parts) for i in range(num_parts)]
    missing = [p for p in parts if not os.path.exists(p + ".summary.json")]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_parts} parts of {prefix!r} have not finished "
                                f"(no summary): {missing[:3]}")
    return parts


def merge_reports(parts: Sequence[str], output_prefix: str) -> Dict[str, Any]:
    """OUTPUT.rejects.jsonl (every part's, in order) and OUTPUT.summary.json (their sums)."""
    summaries = []
    with open(output_prefix + ".rejects.jsonl", "w") as out:
        for p in parts:
            with open(p + ".summary.json") as f:
                summaries.append(json.load(f))
            with open(p + ".rejects.jsonl") as f:
                for line in f:
                    out.write(line)
    total: Dict[str, Any] = {k: sum(s[k] for s in summaries) for k in ("rows", "samples", "rejected", "images", "image_bytes")
                             if all(k in s for s in summaries)}
    reasons: Dict[str, int] = {}
    for s in summaries:
        for reason, n in s["rejects_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    total.update(rejects_by_reason=dict(sorted(reasons.items())), parts=list(parts),
                 reject_fraction=total["rejected"] / total["rows"] if total.get("rows") else 0.0,
                 ok=all(s["ok"] for s in summaries), rejects_file=output_prefix + ".rejects.jsonl")
    with open(output_prefix + ".summary.json", "w") as f:
        json.dump(total, f, indent=1)
    return total


def merge_shards(inputs: Sequence[str], output_prefix: str) -> Dict[str, Any]:
    """Merge the shards of ``inputs`` (in order) into the single shard ``output_prefix``."""
    shards = expand_inputs(inputs)
    readers = [ShardReader(s) for s in shards]
    first = readers[0].metadata
    tokenizer = {k: v for k, v in (first.get("tokenizer") or {}).items() if k != "path"}
    for r in readers[1:]:
        for key in _MUST_MATCH:
            if r.metadata.get(key) != first.get(key):
                raise ValueError(f"cannot merge {r.prefix} into {shards[0]}: {key} differs "
                                 f"({r.metadata.get(key)!r} vs {first.get(key)!r})")
        other = {k: v for k, v in (r.metadata.get("tokenizer") or {}).items() if k != "path"}
        if other != tokenizer:
            raise ValueError(f"cannot merge {r.prefix} into {shards[0]}: made with a different tokenizer")
    with_mask = any(r.metadata.get("has_loss_mask") for r in readers)
    sources: List[str] = []
    for r in readers:
        sources += [s for s in r.metadata.get("sources", []) if s not in sources]
    writer = ShardWriter(
        output_prefix,
        image_store=first["image_store"],
        image_size=first.get("image_size"),
        feature_shape=first.get("feature_shape"),
        with_loss_mask=with_mask,
        metadata={k: first[k] for k in _KEEP if k in first},
    )
    with writer:
        for r in readers:
            writer.append_shard(r)
        return writer.finalize(sources=sources, merged_from=shards)
