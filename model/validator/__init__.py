"""The validator: a ResNet (or ViT) classifier that judges every generated image, and its training."""
