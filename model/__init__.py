"""medsynth: classifier-validated synthetic medical images (Stable Diffusion + LoRA + ResNet validator)."""
