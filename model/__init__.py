"""medsynth: classifier-validated synthetic medical images (Stable Diffusion + LoRA + a validator).

The stable public face. Import the entry points from here; the rooms below may be rearranged,
these names stay:

    from model import load_pipeline, generate, load_classifier, load_lora, inject_lora, \
        reject_sample, load_split

Rooms, in the order of run.sh's stages (read model/sd/ first, alone, like nanoGPT's model.py):
    sd/         the SD core: layers, UNet, VAE, DDIM, text-to-image, the checkpoint loader, tiny SD
    lora/       LoRA layers and files, the latent cache, the LoRA training loop
    validator/  the classifier that judges images, and its training
    reject/     the reject-sampling loop, its run folder, and the generators it draws candidates
                from (SD text-to-image, image-to-image from real images, classifier guidance, a GAN)
    gan/        the conditional GAN baseline (seed paper 002) and its training
    eval/       generation scores, fidelity, memorisation, VAE reconstruction, utility, the report
    mini/       medsynth-mini: pretraining a small SD from scratch (the VAE, then the UNet)
and at the top the plumbing every room uses: io, training, objective, data, metrics, plots.
Imports are lazy, so `import model` stays cheap.
"""
import importlib

_EXPORTS = {
    # the SD core
    "load_pipeline": "model.sd.loader", "load_tokenizer": "model.sd.loader",
    "Pipeline": "model.sd.loader", "generate": "model.sd.sampling", "to_pil": "model.sd.sampling",
    "UNet2DConditionModel": "model.sd.unet", "AutoencoderKL": "model.sd.vae",
    "DDIMScheduler": "model.sd.ddim", "make_tiny_sd": "model.sd.tiny",
    # LoRA
    "inject_lora": "model.lora.layers", "inject_lora_weights": "model.lora.layers",
    "merge_lora": "model.lora.layers", "lora_state": "model.lora.layers",
    "load_lora": "model.lora.files", "save_lora": "model.lora.files",
    "LoRARecipe": "model.lora.recipe", "train_lora": "model.lora.train",
    # the validator
    "load_classifier": "model.validator.classifier", "Classifier": "model.validator.classifier",
    "Recipe": "model.validator.train", "train_classifier": "model.validator.train",
    # medsynth-mini
    "PretrainRecipe": "model.mini.recipe", "pretrain": "model.mini.pretrain",
    # the reject loop
    "reject_sample": "model.reject.loop", "replay": "model.reject.loop",
    "read_manifest": "model.reject.run_folder",
    "SDGenerator": "model.reject.generators", "GANGenerator": "model.reject.generators",
    "InitImages": "model.reject.init_images",
    # the GAN baseline
    "GANRecipe": "model.gan.train", "train_gan": "model.gan.train", "load_gan": "model.gan.generator",
    # evaluation over runs
    "compare_runs": "model.eval.compare",
    "diffusion_classifier": "model.eval.conditioning", "ConditioningSettings": "model.eval.conditioning",
    # data and errors
    "load_split": "model.data", "class_prompts": "model.data", "PATHMNIST_CLASSES": "model.data",
    "UserError": "model.io",
}
_RENAMED = {"train_classifier": "train", "train_lora": "train", "train_gan": "train",
            "compare_runs": "compare"}  # public name -> name inside its module


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
