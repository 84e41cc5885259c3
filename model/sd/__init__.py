"""The Stable Diffusion core: networks, DDIM, text-to-image, and the loader of real checkpoints.
Read it first and alone: it imports nothing from the rest of `model/` but `model.io`."""
