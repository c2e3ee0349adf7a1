"""Evaluation: understanding (answer accuracy, caption perplexity), linear probes of the visual
hidden states, semantic-generation retrieval, and generated text. Pure metric functions live in
``metrics``, ``generation_metrics`` (exact match, VQA accuracy, ANLS, BLEU, CIDEr), ``probes``
and ``retrieval``; ``runners`` applies them to a built model (TP=1, PP=1); ``data`` turns the
demo data's valid.parquet (or a VLMEvalKit TSV) into evaluation samples and generation
prompts; the CLI is ``python -m megatron_unihetero.evaluate``.
"""
