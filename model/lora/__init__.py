"""LoRA: the adapter layers, their file formats, the latent cache and the training loop."""
