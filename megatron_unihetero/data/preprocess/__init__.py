"""Preprocessing raw image-text data into indexed shards (the logic behind tools/*.py).

readers   streaming parquet / jsonl(.gz) / webdataset tar rows
images    decode, RGB, resize shorter side + centre crop
samples   row -> documents (caption / qa / both / interleaved) -> tokens, images, loss mask
features  optional frozen HF vision encoder (store features instead of pixels)
worker    one chunk of rows -> samples and rejects (runs in spawned workers)
pipeline  ordered, memory-bounded driver: shards, PREFIX.rejects.jsonl, PREFIX.summary.json
merge     concatenate shards into one
train_spm SentencePiece training with the image special tokens
fixtures  tiny inputs for tests and benchmarks

Kept import-free: spawned workers import this package.
"""
