"""Evaluation: understanding (answer accuracy, caption perplexity), linear probes of the visual
hidden states, and semantic-generation retrieval. Pure metric functions live in ``metrics``,
``probes`` and ``retrieval``; ``runners`` applies them to a built model (TP=1, PP=1); ``data``
turns the demo data's valid.parquet into evaluation samples; the CLI is
``python -m megatron_unihetero.evaluate``.
"""
