"""The size path (model/data.py): how a data image reaches the model's resolution and comes back.

  - a small margin (28 -> 32) is a reflect pad, and the way back the exact centre crop: the size
    path alone is the identity on real images, so it costs the validator nothing;
  - a large margin (224 -> 512) resizes both ways, with the right shapes;
  - evaluate.py reconstruction's "size path" column is the real images, pixel for pixel;
  - sizes follow the model: the bundled medsynth-mini, with no size flag, makes 32 px images and
    keeps them at the data's own 28 px.
"""
import json
import os

import numpy as np
import torch

from _helpers_pipeline import EXAMPLE_NPZ, ROOT, run
from model.data import from_model_size, load_split, pads, to_model_size
from model.eval.reconstruction import round_trip
from model.sd.loader import model_defaults

MINI = os.path.join(ROOT, "examples", "medsynth-mini")


def test_small_margin_is_a_reflect_pad_and_the_crop_undoes_it():
    x = torch.rand(3, 3, 28, 28)
    y = to_model_size(x, 32)
    assert y.shape == (3, 3, 32, 32)
    assert torch.equal(y[..., 2:30, 2:30], x)
    # reflect: the row above the image mirrors its second row, as numpy's "reflect" pad does
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    assert np.array_equal(y.numpy(), ref)
    assert torch.equal(from_model_size(y, 28), x)


def test_odd_margins_and_the_same_size():
    assert pads(28, 28) == (0, 0) and pads(29, 32) == (1, 2)
    x = torch.rand(1, 3, 29, 29)
    assert torch.equal(from_model_size(to_model_size(x, 32), 29), x)
    assert to_model_size(x, 29) is x


def test_large_margin_or_a_smaller_model_resizes():
    assert pads(224, 512) is None and pads(64, 32) is None
    x = torch.rand(1, 3, 224, 224)
    up = to_model_size(x, 512)
    assert up.shape == (1, 3, 512, 512)
    assert from_model_size(up, 224).shape == (1, 3, 224, 224)


def test_the_size_path_alone_is_the_identity_on_real_images():
    images = load_split(EXAMPLE_NPZ, "test").images                   # uint8 (100, 3, 28, 28)
    assert torch.equal(round_trip(images, 32), images)


def test_sizes_follow_the_bundled_model():
    d = model_defaults(MINI)
    assert d["resolution"] == 32 and d["image_size"] == 28


def test_sample_validated_on_the_bundled_model_without_size_flags(tmp_path):
    from _helpers_reject import always, save
    clf = save(always(0), str(tmp_path / "clf.safetensors"))      # a validator that says class 0 to all
    out = tmp_path / "synth"
    job = run("sample_validated.py", ["--model", MINI, "--classifier", clf, "--classes", "0", "--per-class", "2",
                                      "--max-attempts", "1", "--batch-size", "2", "--out", str(out)], cwd=str(tmp_path))
    assert job.returncode == 0, job.stderr[-2000:]
    settings = json.load(open(out / "run.json"))["settings"]
    assert (settings["height"], settings["width"], settings["image_size"]) == (32, 32, 28)
    from PIL import Image
    kept = sorted((out / "adipose").glob("adipose_*.png"))
    assert kept and all(Image.open(p).size == (28, 28) for p in kept)


def test_train_lora_conditioning_and_reconstruction_on_the_bundled_model_without_size_flags(tmp_path):
    from _helpers_reject import always, save
    from model.lora.files import load_lora
    lora = tmp_path / "lora"
    job = run("train_lora.py", ["--preset", "mini", "--max-steps", "2", "--batch-size", "4", "--save-every", "2",
                                "--sample-every", "0", "--conditioning-images", "0", "--out", str(lora)], cwd=str(tmp_path))
    assert job.returncode == 0, job.stderr[-2000:]
    meta = load_lora(str(lora / "lora.safetensors"))[1]
    assert (meta["resolution"], meta["image_size"]) == (32, 28)
    cond = tmp_path / "cond"
    job = run("evaluate.py", ["conditioning", "--lora", str(lora / "lora.safetensors"), "--data", EXAMPLE_NPZ,
                              "--images-per-class", "1", "--draws", "1", "--out", str(cond)], cwd=str(tmp_path))
    assert job.returncode == 0, job.stderr[-2000:]
    assert json.load(open(cond / "conditioning.json"))["resolution"] == 32
    clf = save(always(0), str(tmp_path / "clf.safetensors"))
    rec = tmp_path / "rec"
    job = run("evaluate.py", ["reconstruction", "--model", MINI, "--classifier", clf, "--data", EXAMPLE_NPZ,
                              "--out", str(rec)], cwd=str(tmp_path))
    assert job.returncode == 0, job.stderr[-2000:]
    result = json.load(open(rec / "reconstruction.json"))
    assert result["resolution"] == 32
    assert result["columns"]["size_path"]["psnr_db"] >= 99  # the same pixels: PSNR at its cap
