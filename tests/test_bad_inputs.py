"""Bad input gets one line on stderr and exit code 2, never a traceback, and nothing is written.

ONE table, CASES: each row runs one of the four scripts as a user would (a subprocess, cwd = a
fresh case folder) on one bad input that its `setup` makes, and `test_bad_input` asserts
  - exit code 2;
  - stderr is exactly one non-empty line, starting with "error:", matching the row's regex (which
    names the problem and, where there is one, the file); no "Traceback" anywhere;
  - nothing was written: the case folder (holding --out, the bad files and the cwd) is byte for
    byte and mtime for mtime what setup left, and --out was not created. A pickle payload that
    would create a folder there if it were ever unpickled makes this also prove that no pickle is
    loaded without weights_only=True.
Rows marked `nan` are the exception: a NaN loss is found only while training, after the progress
bar has been drawn and after earlier checkpoints were written, so there the other lines of stderr
may be progress-bar redraws and the check is that no final output file was written.

The selected rows run in a module fixture, two processes at a time, each forked from a process
that has imported torch & co. once (_helpers_pipeline.Zygote: the unmodified script runs as
__main__ with its argv, cwd and environment), then each row is checked on its own.
"""
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from _helpers_pipeline import EXAMPLE_NPZ, Zygote, make_classifier, make_lora, make_sd, script_env, snapshot
from model.data import PATHMNIST_CLASSES

WORKERS = 2


# ------------------------------------------------------------------------------ bad-file makers

def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def truncate(src, dst):
    data = open(src, "rb").read()
    write(dst, data[:len(data) // 2])


def garbage(path):
    write(path, b"\x13\x37 this is not a weights file \x00" * 40)


class Payload:
    """Unpickling this creates the folder MARKER: a file that needs full pickle to load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def pickle_ckpt(path, case):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Payload(os.path.join(case, "UNPICKLED"))}, path)


def npz(path, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)


def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def labels(values):
    return np.array(values, dtype=np.uint8).reshape(-1, 1)


def good_splits(n=12):
    return {f"{s}_{k}": (images(n) if k == "images" else labels([i % 9 for i in range(n)]))
            for s in ("train", "val", "test") for k in ("images", "labels")}


def png(path, seed=0):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(images(1, 16, seed)[0]).save(path)


# -------------------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    script: str
    argv: list                 # str.format'ed with fx (shared fixtures), case (this row's folder), out
    error: str                 # regex the single stderr line must match (searched)
    setup: object = None       # setup(case folder, fixture folder) makes the bad input
    env: dict = field(default_factory=dict)   # also str.format'ed
    nan: bool = False          # NaN loss: progress bars allowed; final outputs must not exist
    final: tuple = ()          # with nan: files below --out that must not exist


# Small, fast settings so a row that wrongly got past its bad input would still end quickly.
LORA = ["--preset", "tiny", "--model", "{fx}/sd", "--max-steps", "2", "--batch-size", "2",
        "--sample-every", "0", "--out", "{out}"]
CLF = ["--data", EXAMPLE_NPZ, "--epochs", "1", "--batch-size", "8", "--few-shot", "2", "--image-size", "16",
       "--out", "{out}"]
SAMPLE = ["--model", "{fx}/sd", "--classifier", "{fx}/clf.safetensors", "--classes", "0", "--per-class", "1",
          "--steps", "2", "--resolution", "64", "--max-attempts", "2", "--out", "{out}"]
EVAL = ["classifier", "--classifier", "{fx}/clf.safetensors", "--data", EXAMPLE_NPZ, "--out", "{out}"]
CACHE = {"MEDSYNTH_CACHE": "{case}/cache"}
RECON = ["reconstruction", "--model", "{fx}/sd", "--classifier", "{fx}/clf.safetensors", "--data", EXAMPLE_NPZ,
         "--out", "{out}"]
COND = ["conditioning", "--model", "{fx}/sd", "--data", EXAMPLE_NPZ, "--images-per-class", "1", "--draws", "1",
        "--resolution", "64", "--out", "{out}"]
PRETRAIN = ["--preset", "smoke", "--data", EXAMPLE_NPZ, "--vae-steps", "2", "--unet-steps", "2",
            "--vae-batch-size", "2", "--unet-batch-size", "2", "--out", "{out}"]


def with_flags(base, **flags):
    """base argv with --flag value pairs replaced (or appended)."""
    argv = list(base)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return argv


def s_truncated_sd(case, fx):
    shutil.copytree(os.path.join(fx, "sd"), os.path.join(case, "sd"))
    truncate(os.path.join(fx, "sd", "unet", "diffusion_pytorch_model.safetensors"),
             os.path.join(case, "sd", "unet", "diffusion_pytorch_model.safetensors"))


def s_pickle(name):
    return lambda case, fx: pickle_ckpt(os.path.join(case, name), case)


def s_garbage(name):
    return lambda case, fx: garbage(os.path.join(case, name))


def s_truncated(src, name):
    return lambda case, fx: truncate(os.path.join(fx, src), os.path.join(case, name))


def s_missing_keys(case, fx):
    npz(os.path.join(case, "data.npz"), train_images=images(12), val_images=images(4), val_labels=labels([0] * 4))


def s_no_val_split(case, fx):
    npz(os.path.join(case, "data.npz"), **{k: v for k, v in good_splits().items() if not k.startswith("val_")})


def s_bad_md5(case, fx):
    npz(os.path.join(case, "cache", "pathmnist.npz"), **good_splits())  # valid layout, wrong file


def s_empty_folder(case, fx):
    os.makedirs(os.path.join(case, "images"))


def s_empty_class(case, fx):
    for i in range(4):
        png(os.path.join(case, "images", "adipose", f"a{i}.png"), i)
    os.makedirs(os.path.join(case, "images", "debris"))


def s_labels_out_of_range(case, fx):
    arrays = good_splits()
    arrays["train_labels"] = labels([3, 9, 12] * 4)
    arrays["val_labels"] = labels([0, 1, 2] * 4)
    npz(os.path.join(case, "data.npz"), **arrays)


def s_file(case, fx):
    write(os.path.join(case, "file.txt"), "a file, not a folder\n")


def s_other_run(case, fx):
    """--out holds a finished sample_validated.py run made with other settings."""
    write(os.path.join(case, "out", "run.json"), '{"settings": {"per_class": 99}, "status": "complete"}\n')
    write(os.path.join(case, "out", "manifest.csv"),
          "file,class_index,class_name,prompt,seed,attempt,predicted_index,prob_prompted,accepted\n")


def s_other_lora(case, fx):
    """--out holds a finished train_lora.py result made with other settings."""
    os.makedirs(os.path.join(case, "out"))
    shutil.copy(os.path.join(fx, "lora.safetensors"), os.path.join(case, "out", "lora.safetensors"))


def s_state(maker):
    return lambda case, fx: maker(os.path.join(case, "out", "state.pt"), case)


def s_not_a_run(case, fx):
    os.makedirs(os.path.join(case, "run", "adipose"))


def s_image_run(case, fx):
    """A folder of generated images, one sub-folder per class (as evaluate.py accepts)."""
    for name in ("adipose", "background"):
        for i in range(3):
            png(os.path.join(case, "run", name, f"{name}_{i:04d}.png"), i)


def s_other_conditioning(case, fx):
    """--out holds a finished evaluate.py conditioning result made with other settings."""
    write(os.path.join(case, "out", "conditioning.json"),
          '{"accuracy": 0.5, "settings": {"split": "val", "images_per_class": 1, "draws": 99}}\n')


MISSING = r"file not found|no such file"
def s_gan(case, fx):
    """A small random GAN checkpoint at case/gan.safetensors."""
    from model.gan.generator import save_gan
    from model.gan.nets import Generator
    config = {"num_classes": 9, "z_dim": 4, "embed_dim": 4, "channels": 4, "resolution": 8}
    save_gan(os.path.join(case, "gan.safetensors"), Generator(**config), config, PATHMNIST_CLASSES, {})


CASES = [
    # --- train_lora.py
    Case("lora/missing-model", "train_lora.py", with_flags(LORA, model="{case}/no-such-sd"),
         r"no-such-sd: no such file or folder"),
    Case("lora/truncated-model-safetensors", "train_lora.py", with_flags(LORA, model="{case}/sd"),
         r"sd/unet/diffusion_pytorch_model\.safetensors: not a valid \.safetensors file", s_truncated_sd),
    Case("lora/pickle-ckpt-model", "train_lora.py", with_flags(LORA, model="{case}/model.ckpt"),
         r"model\.ckpt: cannot be loaded safely with weights_only=True", s_pickle("model.ckpt")),
    Case("lora/garbage-ckpt-model", "train_lora.py", with_flags(LORA, model="{case}/model.ckpt"),
         r"model\.ckpt: cannot be loaded safely", s_garbage("model.ckpt")),
    Case("lora/npz-missing-keys", "train_lora.py", with_flags(LORA, data="{case}/data.npz"),
         r"data\.npz: missing key 'train_labels'", s_missing_keys),
    Case("lora/npz-wrong-md5", "train_lora.py", with_flags(LORA, data="pathmnist"),
         r"cache/pathmnist\.npz has MD5 [0-9a-f]{32}, expected a8b06965200029087d5bd730944a56c1", s_bad_md5,
         env=CACHE),
    Case("lora/empty-image-folder", "train_lora.py", with_flags(LORA, data="{case}/images"),
         r"images: no class sub-folders", s_empty_folder),
    Case("lora/empty-class-folder", "train_lora.py", with_flags(LORA, data="{case}/images"),
         r"images/debris: class folder holds no images", s_empty_class),
    Case("lora/labels-out-of-range", "train_lora.py", with_flags(LORA, data="{case}/data.npz"),
         r"data\.npz: train_labels out of range", s_labels_out_of_range),
    Case("lora/unwritable-out", "train_lora.py", with_flags(LORA, out="{case}/file.txt/out"),
         r"file\.txt.*(not a folder|Not a directory)", s_file),
    Case("lora/max-steps-negative", "train_lora.py", with_flags(LORA, max_steps=-5),
         r"--max-steps must be at least 1, got -5"),
    Case("lora/batch-size-0", "train_lora.py", with_flags(LORA, batch_size=0),
         r"--batch-size must be at least 1, got 0"),
    Case("lora/few-shot-0", "train_lora.py", with_flags(LORA, few_shot=0),
         r"--few-shot 0: must be at least 1"),
    Case("lora/finished-with-other-settings", "train_lora.py", LORA,
         r"out/lora\.safetensors was trained with other settings.*--overwrite", s_other_lora),
    Case("lora/nan-loss", "train_lora.py", with_flags(LORA, lr="1e30", max_steps=4, save_every=1),
         r"loss became (nan|inf) at step \d+", nan=True, final=("lora.safetensors",)),

    # --- train_classifier.py
    Case("classifier/missing-data", "train_classifier.py", with_flags(CLF, data="{case}/nothing.npz"),
         r"--data \S*nothing\.npz: not a file or folder"),
    Case("classifier/npz-missing-keys", "train_classifier.py", with_flags(CLF, data="{case}/data.npz"),
         r"data\.npz: missing key 'train_labels'", s_missing_keys),
    Case("classifier/npz-wrong-md5", "train_classifier.py", with_flags(CLF, data="pathmnist"),
         r"cache/pathmnist\.npz has MD5 [0-9a-f]{32}, expected a8b06965200029087d5bd730944a56c1", s_bad_md5,
         env=CACHE),
    Case("classifier/empty-image-folder", "train_classifier.py", with_flags(CLF, data="{case}/images"),
         r"images: no class sub-folders", s_empty_folder),
    Case("classifier/empty-class-folder", "train_classifier.py", with_flags(CLF, data="{case}/images"),
         r"images/debris: class folder holds no images", s_empty_class),
    Case("classifier/labels-out-of-range", "train_classifier.py", with_flags(CLF, data="{case}/data.npz"),
         r"data\.npz: train_labels out of range", s_labels_out_of_range),
    Case("classifier/unwritable-out", "train_classifier.py", with_flags(CLF, out="{case}/file.txt/out"),
         r"file\.txt.*(not a folder|Not a directory)", s_file),
    Case("classifier/epochs-0", "train_classifier.py", with_flags(CLF, epochs=0), r"--epochs 0: must be"),
    Case("classifier/batch-size-0", "train_classifier.py", with_flags(CLF, batch_size=0),
         r"--batch-size 0: must be"),
    Case("classifier/few-shot-negative", "train_classifier.py", with_flags(CLF, few_shot=-1),
         r"--few-shot -1: must be at least 1"),
    Case("classifier/pickle-pretrained", "train_classifier.py", with_flags(CLF, pretrained="{case}/resnet.pth"),
         r"resnet\.pth: cannot be loaded safely with weights_only=True", s_pickle("resnet.pth")),
    Case("classifier/pickle-resume-state", "train_classifier.py", CLF + ["--resume"],
         r"state\.pt: cannot be loaded safely with weights_only=True", s_state(pickle_ckpt)),
    Case("classifier/corrupt-resume-state", "train_classifier.py", CLF + ["--resume"],
         r"state\.pt: cannot be loaded safely", s_state(lambda p, case: garbage(p))),
    Case("classifier/nan-loss", "train_classifier.py", with_flags(CLF, lr="1e30"),
         r"loss became (nan|inf)", nan=True, final=("classifier.safetensors", "metrics.json")),

    # --- sample_validated.py
    Case("sample/missing-model", "sample_validated.py", with_flags(SAMPLE, model="{case}/no-such-sd"),
         r"no-such-sd: no such file or folder"),
    Case("sample/truncated-model-safetensors", "sample_validated.py", with_flags(SAMPLE, model="{case}/sd"),
         r"sd/unet/diffusion_pytorch_model\.safetensors: not a valid \.safetensors file", s_truncated_sd),
    Case("sample/pickle-ckpt-model", "sample_validated.py", with_flags(SAMPLE, model="{case}/model.ckpt"),
         r"model\.ckpt: cannot be loaded safely with weights_only=True", s_pickle("model.ckpt")),
    Case("sample/missing-lora", "sample_validated.py", with_flags(SAMPLE, lora="{case}/lora.safetensors"),
         r"lora\.safetensors: (" + MISSING + ")"),
    Case("sample/garbage-lora", "sample_validated.py", with_flags(SAMPLE, lora="{case}/lora.safetensors"),
         r"lora\.safetensors: not a valid \.safetensors file", s_garbage("lora.safetensors")),
    Case("sample/truncated-lora", "sample_validated.py", with_flags(SAMPLE, lora="{case}/lora.safetensors"),
         r"lora\.safetensors: not a valid \.safetensors file", s_truncated("lora.safetensors", "lora.safetensors")),
    Case("sample/lora-for-other-base-model", "sample_validated.py",
         with_flags(SAMPLE, model="{fx}/wide", lora="{fx}/lora.safetensors"),
         r"LoRA does not fit the base model at unet\.\S+.*different base model"),
    Case("sample/missing-classifier", "sample_validated.py", with_flags(SAMPLE, classifier="{case}/clf.safetensors"),
         r"clf\.safetensors: (" + MISSING + ")"),
    Case("sample/truncated-classifier", "sample_validated.py",
         with_flags(SAMPLE, classifier="{case}/clf.safetensors"),
         r"clf\.safetensors: not a valid \.safetensors file", s_truncated("clf.safetensors", "clf.safetensors")),
    Case("sample/lora-given-as-classifier", "sample_validated.py",
         with_flags(SAMPLE, classifier="{fx}/lora.safetensors"), r"lora\.safetensors: not a medsynth classifier"),
    Case("sample/unknown-class-name", "sample_validated.py", with_flags(SAMPLE, classes="foo"),
         r"unknown class 'foo'; known: adipose, background"),
    Case("sample/class-index-out-of-range", "sample_validated.py", with_flags(SAMPLE, classes="9"),
         r"unknown class '9'"),
    Case("sample/unwritable-out", "sample_validated.py", with_flags(SAMPLE, out="{case}/file.txt/out"),
         r"--out \S*file\.txt/out: \S*file\.txt is a file, not a folder", s_file),
    Case("sample/per-class-0", "sample_validated.py", with_flags(SAMPLE, per_class=0),
         r"--per-class 0: must be at least 1"),
    Case("sample/per-class-negative", "sample_validated.py", with_flags(SAMPLE, per_class=-1),
         r"--per-class -1: must be at least 1"),
    Case("sample/max-attempts-0", "sample_validated.py", with_flags(SAMPLE, max_attempts=0),
         r"--max-attempts 0: must be at least 1"),
    Case("sample/steps-0", "sample_validated.py", with_flags(SAMPLE, steps=0), r"--steps 0: must be at least 1"),
    Case("sample/batch-size-0", "sample_validated.py", with_flags(SAMPLE, batch_size=0),
         r"--batch-size 0: must be at least 1"),
    Case("sample/per-class-not-a-number", "sample_validated.py", with_flags(SAMPLE, per_class="abc"),
         r"sample_validated\.py: argument --per-class: invalid int value: 'abc'"),
    Case("sample/out-holds-other-run", "sample_validated.py", SAMPLE,
         r"out holds a run with other settings.*--overwrite", s_other_run),
    Case("sample/strength-without-init-images", "sample_validated.py", with_flags(SAMPLE, strength=0.5),
         r"--strength needs --init-images"),
    Case("sample/strength-2", "sample_validated.py", with_flags(SAMPLE, strength=2, init_images=EXAMPLE_NPZ),
         r"--strength 2(\.0)?: must be in \[0, 1\]"),
    Case("sample/classifier-guidance-negative", "sample_validated.py", with_flags(SAMPLE, classifier_guidance=-1),
         r"--classifier-guidance -1(\.0)?: must be >= 0"),
    Case("sample/init-images-missing", "sample_validated.py", with_flags(SAMPLE, init_images="{case}/nothing"),
         r"--init-images \S*nothing: no such file or folder"),
    Case("sample/generator-not-a-gan", "sample_validated.py", with_flags(SAMPLE, generator="{fx}/clf.safetensors"),
         r"--generator \S*clf\.safetensors: not a train_gan\.py checkpoint"),
    Case("sample/gan-with-lora", "sample_validated.py",
         with_flags(SAMPLE, model="{case}/gan.safetensors", lora="{fx}/lora.safetensors"),
         r"--lora does not apply to a GAN --generator", s_gan),

    # --- evaluate.py
    Case("evaluate/missing-classifier", "evaluate.py", with_flags(EVAL, classifier="{case}/clf.safetensors"),
         r"clf\.safetensors: (" + MISSING + ")"),
    Case("evaluate/truncated-classifier", "evaluate.py", with_flags(EVAL, classifier="{case}/clf.safetensors"),
         r"clf\.safetensors: not a valid \.safetensors file", s_truncated("clf.safetensors", "clf.safetensors")),
    Case("evaluate/npz-missing-keys", "evaluate.py", with_flags(EVAL, data="{case}/data.npz"),
         r"data\.npz: missing key 'test_(images|labels)'", s_missing_keys),
    Case("evaluate/npz-wrong-md5", "evaluate.py", with_flags(EVAL, data="pathmnist"),
         r"cache/pathmnist\.npz has MD5 [0-9a-f]{32}, expected a8b06965200029087d5bd730944a56c1", s_bad_md5,
         env=CACHE),
    Case("evaluate/unwritable-out", "evaluate.py", with_flags(EVAL, out="{case}/file.txt/out"),
         r"file\.txt.*(not a folder|Not a directory)", s_file),
    Case("evaluate/batch-size-0", "evaluate.py", with_flags(EVAL, batch_size=0), r"--batch-size 0: must be"),
    Case("evaluate/unknown-subcommand", "evaluate.py", ["classify", "--out", "{out}"],
         r"evaluate\.py: argument command: invalid choice: 'classify'"),
    Case("evaluate/generation-empty-run", "evaluate.py", ["generation", "--run", "{case}/run", "--out", "{out}"],
         r"run: no manifest\.csv", s_not_a_run),
    Case("evaluate/fidelity-empty-run", "evaluate.py",
         ["fidelity", "--run", "{case}/run", "--data", EXAMPLE_NPZ, "--classifier", "{fx}/clf.safetensors",
          "--out", "{out}"], r"run: no manifest\.csv and no class sub-folders with images", s_not_a_run),
    Case("evaluate/utility-epochs-0", "evaluate.py",
         ["utility", "--run", "{case}/run", "--data", EXAMPLE_NPZ, "--epochs", "0", "--out", "{out}"],
         r"--epochs 0: must be", s_image_run),
    Case("evaluate/utility-synthetic-per-class-0", "evaluate.py",
         ["utility", "--run", "{case}/run", "--data", EXAMPLE_NPZ, "--synthetic-per-class", "0", "--out", "{out}"],
         r"--synthetic-per-class 0: must be at least 1", s_image_run),
    Case("evaluate/study-unknown-arm", "evaluate.py",
         ["study", "--quick", "--preset", "tiny", "--arms", "nope", "--out", "{out}"],
         r"--arms nope: not an arm of this study \(validator, judge, lora, "),

    Case("evaluate/conditioning-missing-data", "evaluate.py", with_flags(COND, data="{case}/nothing.npz"),
         r"--data \S*nothing\.npz: not a file or folder"),
    Case("evaluate/conditioning-unknown-split", "evaluate.py", with_flags(COND, split="training"),
         r"argument --split: invalid choice: 'training'"),
    Case("evaluate/conditioning-draws-0", "evaluate.py", with_flags(COND, draws=0), r"--draws 0: must be at least 1"),
    Case("evaluate/conditioning-missing-lora", "evaluate.py", with_flags(COND, lora="{case}/lora.safetensors"),
         r"lora\.safetensors: (" + MISSING + ")"),
    Case("evaluate/conditioning-garbage-lora", "evaluate.py", with_flags(COND, lora="{case}/lora.safetensors"),
         r"lora\.safetensors: not a valid \.safetensors file", s_garbage("lora.safetensors")),
    Case("evaluate/conditioning-lora-for-other-base-model", "evaluate.py",
         with_flags(COND, model="{fx}/wide", lora="{fx}/lora.safetensors"),
         r"LoRA does not fit the base model at unet\.\S+.*different base model"),
    Case("evaluate/conditioning-other-settings", "evaluate.py", COND,
         r"out holds a conditioning result with other settings \(draws: 99 there, 1 now, and \d+ more\).*--overwrite",
         s_other_conditioning),

    # --- pretrain.py
    Case("evaluate/reconstruction-missing-model", "evaluate.py", with_flags(RECON, model="{case}/nothing"),
         r"nothing"),
    Case("evaluate/reconstruction-resolution-12", "evaluate.py", with_flags(RECON, resolution=12),
         r"--resolution 12: must be a positive multiple of 8"),
    Case("pretrain/missing-data", "pretrain.py", with_flags(PRETRAIN, data="{case}/nothing.npz"),
         r"--data \S*nothing\.npz: not a file or folder"),
    Case("pretrain/npz-without-val-split", "pretrain.py", with_flags(PRETRAIN, data="{case}/data.npz"),
         r"data\.npz: missing key 'val_images'", s_no_val_split),
    Case("pretrain/vae-steps-0", "pretrain.py", with_flags(PRETRAIN, vae_steps=0), r"--vae-steps 0: must be"),
    Case("pretrain/resolution-30", "pretrain.py", with_flags(PRETRAIN, resolution=30),
         r"--resolution 30: must be a multiple of 16"),
    Case("pretrain/caption-dropout-1.5", "pretrain.py", with_flags(PRETRAIN, caption_dropout=1.5),
         r"--caption-dropout 1\.5: must be in \[0, 1\]"),
    Case("pretrain/vae-lr-negative", "pretrain.py", with_flags(PRETRAIN, vae_lr=-1), r"--vae-lr -1(\.0)?: must be"),
    Case("pretrain/unwritable-out", "pretrain.py", with_flags(PRETRAIN, out="{case}/file.txt/out"),
         r"--out \S*file\.txt/out: \S*file\.txt is a file, not a folder", s_file),
    Case("pretrain/unknown-preset", "pretrain.py", with_flags(PRETRAIN, preset="huge"),
         r"pretrain\.py: argument --preset: invalid choice: 'huge'"),
    Case("pretrain/nan-loss", "pretrain.py", with_flags(PRETRAIN, vae_lr="1e30", save_every=1),
         r"vae loss became (nan|inf) at step \d+", nan=True, final=("model/model_index.json", "model/pretrain.json")),
]


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Shared good inputs: the tiny SD, a variant with other UNet widths, a LoRA for the tiny SD
    and a 16 px validator."""
    folder = str(tmp_path_factory.mktemp("fixtures"))
    make_sd(os.path.join(folder, "sd"))
    make_sd(os.path.join(folder, "wide"), widths=(48, 96))
    make_lora(os.path.join(folder, "sd"), os.path.join(folder, "lora.safetensors"))
    make_classifier(os.path.join(folder, "clf.safetensors"))
    return folder


@pytest.fixture(scope="module")
def results(request, fx, tmp_path_factory):
    """Set up and run every selected row (WORKERS processes at a time):
    {id: ({returncode, stdout, stderr}, case folder, out, snapshot of the case folder before the run)}."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.originalname == "test_bad_input" and item.module is request.module}
    before_fx = snapshot(fx)
    root = str(tmp_path_factory.mktemp("cases"))
    jobs = []
    for c in CASES:
        if c.id not in selected:
            continue
        case = os.path.join(root, c.id.replace("/", "__"))
        os.makedirs(case)
        paths = {"fx": fx, "case": case, "out": os.path.join(case, "out")}
        if c.setup is not None:
            c.setup(case, fx)
        argv = [a.format(**paths) for a in c.argv]
        env = script_env(**{"MEDSYNTH_CACHE": os.path.join(case, "no-cache"),
                            **{k: v.format(**paths) for k, v in c.env.items()}})
        jobs.append((c, case, paths["out"], argv, env, snapshot(case)))
    # Let the filesystem clock move on, so that a rewrite with equal bytes still shows in mtimes.
    time.sleep(0.01)
    zygote = Zygote()
    try:
        ran = zygote.run_many([{"script": c.script, "argv": argv, "cwd": case, "env": env}
                               for c, case, out, argv, env, snap in jobs], workers=WORKERS, timeout=240)
        done = {c.id: ({"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}, case, out, snap)
                for (c, case, out, argv, env, snap), r in zip(jobs, ran)}
    finally:
        zygote.close()
    assert snapshot(fx) == before_fx, "a script wrote into the shared fixtures"
    return done


PROGRESS = re.compile(r"(\d+%\|)|(\d+/\d+ \[)|(it/s|s/it|step/s|s/step)\]")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, results):
    r, folder, out, before = results[case.id]
    stderr, stdout, code = r["stderr"], r["stdout"], r["returncode"]
    shown = f"exit {code}\n--- stderr:\n{stderr}\n--- stdout:\n{stdout[-2000:]}"
    assert "Traceback" not in stderr + stdout, shown
    assert code == 2, shown
    lines = [ln for ln in stderr.split("\n") if ln.strip()]
    if case.nan:
        # Progress bars redraw with \r and end with \n; they are the only other lines allowed.
        lines = [ln for ln in lines if not ("\r" in ln or PROGRESS.search(ln))]
    assert len(lines) == 1, f"stderr must be exactly one line\n{shown}"
    line = lines[0]
    assert line.startswith("error: "), shown
    assert re.search(case.error, line), f"{case.error!r} not found in the error line\n{shown}"
    after = snapshot(folder)
    if case.nan:
        for name in case.final:
            assert not os.path.exists(os.path.join(out, name)), f"{name} was written despite the NaN loss"
        assert not os.path.exists(os.path.join(folder, "UNPICKLED"))
        return
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the failed run wrote: {changed}\n{shown}"
    if not any(k == "out/" or k.startswith("out/") for k in before):
        assert not os.path.exists(out), "--out was created"


def test_the_pickle_payload_would_be_noticed(tmp_path):
    """The pickle rows prove something only if unpickling the file really leaves a trace."""
    path = tmp_path / "model.ckpt"
    pickle_ckpt(str(path), str(tmp_path))
    assert not (tmp_path / "UNPICKLED").exists()
    torch.load(path, weights_only=False)
    assert (tmp_path / "UNPICKLED").is_dir()


def test_every_kind_of_bad_input_is_in_the_table():
    """The issue's list, each kind tried on the scripts it applies to."""
    ids = {c.id for c in CASES}
    kinds = {
        "missing model": ["lora/missing-model", "sample/missing-model"],
        "corrupt model": ["lora/truncated-model-safetensors", "sample/truncated-model-safetensors"],
        "pickle checkpoint never unpickled": ["lora/pickle-ckpt-model", "sample/pickle-ckpt-model",
                                              "classifier/pickle-pretrained", "classifier/pickle-resume-state"],
        "missing/corrupt LoRA": ["sample/missing-lora", "sample/garbage-lora", "sample/truncated-lora",
                                 "evaluate/conditioning-missing-lora", "evaluate/conditioning-garbage-lora"],
        "LoRA for another base model": ["sample/lora-for-other-base-model"],
        "missing/corrupt classifier": ["sample/missing-classifier", "sample/truncated-classifier",
                                       "evaluate/missing-classifier", "evaluate/truncated-classifier"],
        "npz missing keys": ["lora/npz-missing-keys", "classifier/npz-missing-keys", "evaluate/npz-missing-keys"],
        "npz wrong MD5": ["lora/npz-wrong-md5", "classifier/npz-wrong-md5", "evaluate/npz-wrong-md5"],
        "empty image / class folder": ["lora/empty-image-folder", "lora/empty-class-folder",
                                       "classifier/empty-image-folder", "classifier/empty-class-folder"],
        "labels out of range": ["lora/labels-out-of-range", "classifier/labels-out-of-range"],
        "unknown class names": ["sample/unknown-class-name", "sample/class-index-out-of-range"],
        "unwritable output folder": ["lora/unwritable-out", "classifier/unwritable-out", "sample/unwritable-out",
                                     "evaluate/unwritable-out"],
        "zero or negative numbers": ["sample/per-class-0", "sample/per-class-negative", "sample/max-attempts-0",
                                     "sample/steps-0", "classifier/epochs-0", "lora/max-steps-negative",
                                     "lora/batch-size-0"],
        "NaN loss": ["lora/nan-loss", "classifier/nan-loss"],
        "malformed flag (argparse)": ["sample/per-class-not-a-number", "evaluate/unknown-subcommand"],
    }
    for kind, rows in kinds.items():
        assert set(rows) <= ids, f"{kind}: missing rows {set(rows) - ids}"
    assert len(ids) == len(CASES), "duplicate row ids"
