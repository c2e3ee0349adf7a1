"""Checkpoint layouts: per-rank shards <-> one full (TP=1, PP=1) state dict."""
