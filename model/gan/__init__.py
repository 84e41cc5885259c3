"""A conditional GAN baseline (seed paper 002): G(z|c) and D(x|c) trained adversarially on the same
32 px PathMNIST images as medsynth-mini, a generator the reject loop can sample from like SD.

    nets.py       the two networks (DCGAN-style generator, projection discriminator with spectral
                  norm) and the hinge loss
    generator.py  the gan.safetensors file: save_gan, is_gan_file, load_gan(...).sample
    train.py      GANRecipe and the training loop (EMA generator, exact resume, Ctrl-C)
"""
