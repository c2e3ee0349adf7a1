"""Generation from a trained model: images by semantic autoregression + pixel diffusion."""
