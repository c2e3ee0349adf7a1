"""Merge shards into one shard (tools/merge_shards.py).

The data files are concatenated with ``IndexedDatasetBuilder.add_index`` (a byte copy plus the
index arrays), so merging never decodes samples, except for writing default loss masks of
shards without one when others have one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from megatron_unihetero.data.shards import ShardReader, ShardWriter, list_shards

# Metadata that must agree between merged shards (else the merged shard would lie).
_MUST_MATCH = ("image_store", "image_size", "feature_shape", "feature_dtype")


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Each input is a shard prefix or a dataset prefix (all its shards, in order)."""
    out: List[str] = []
    for p in inputs:
        shards = list_shards(p)
        if not shards:
            raise FileNotFoundError(f"no finished shard found for {p!r} (looked for {p}.json and {p}_NNNNN.json)")
        out.extend(shards)
    return out


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
        metadata={k: first[k] for k in ("tokenizer", "sample_config", "vision_model", "vision_model_type", "feature_source") if k in first},
    )
    with writer:
        for r in readers:
            writer.append_shard(r)
        return writer.finalize(sources=sources, merged_from=shards)
