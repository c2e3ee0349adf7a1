"""Generation from a trained model: text (text.py: greedy / sampled, KV-cached) and images by
semantic autoregression + pixel diffusion (sample.py)."""
