"""medsynth-mini: a small Stable Diffusion pretrained from scratch on real histology, on a CPU.

The same architecture as SD (our AutoencoderKL and UNet2DConditionModel, a transformers
CLIPTextModel), scaled down and trained in two stages by `pretrain.py`: the VAE, then the UNet on
its cached latents. It plays the part SD1.5 plays in the paper: a base that knows what tissue
looks like but not the nine classes, which LoRA then teaches with class prompts.
"""
