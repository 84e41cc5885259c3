"""LoRA: the adapter layers, their file formats, the training recipe, the latent cache and the loop."""
