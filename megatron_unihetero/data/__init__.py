"""Data pipeline: demo data, tokenizers, preprocessing into indexed shards, and loading.

Kept import-free on purpose: megatron.core, torch and transformers are heavy, and spawned
preprocessing workers import this package.
"""
