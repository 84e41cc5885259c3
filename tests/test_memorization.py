"""`evaluate.py memorization` finds a planted copy of a training image, does not call unseen real
tissue a copy, and refuses bad input with one line and exit 2.

The run is a folder of class sub-folders (as a run made elsewhere): random-noise images plus two
planted copies of training images of the bundled npz, one saved at 28 px as it is and one upscaled
to 64 px with model/data.py's resize (as the generator's training data is), so one run has two sides.
Every script run is forked from one process that imported torch once (_helpers_pipeline.Zygote).
"""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers_pipeline import EXAMPLE_NPZ, Zygote, make_classifier
from model.data import load_split, resize_uint8
from model.eval.memorization import COPY_THRESHOLD, image_features
from model.eval.fidelity import ClassifierFeatures

NOISE = {"adipose": 2, "debris": 2}   # class -> random-noise images at 64 px


def save(path, image):  # (3, H, W) uint8
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("memorization")
    train = load_split(EXAMPLE_NPZ, "train")
    rng = np.random.default_rng(0)
    run = root / "run"
    for c, n in NOISE.items():
        for i in range(n):
            save(str(run / c / f"{c}_{i:04d}.png"), torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)))
    # one planted copy per kind, of a debris and of a lymphocytes training image (not blank background)
    exact = int(torch.nonzero(train.labels == train.classes.index("debris"))[0])
    upscaled = int(torch.nonzero(train.labels == train.classes.index("lymphocytes"))[0])
    save(str(run / "debris" / "debris_copy.png"), train.images[exact])
    save(str(run / "lymphocytes" / "lymphocytes_copy.png"), resize_uint8(train.images[upscaled:upscaled + 1], 64)[0])
    clf = make_classifier(str(root / "clf.safetensors"))
    zygote = Zygote()
    yield {"root": root, "run": run, "clf": clf, "planted": {"debris/debris_copy.png": exact,
                                                              "lymphocytes/lymphocytes_copy.png": upscaled},
           "zygote": zygote}
    zygote.close()


def memorization(fx, *argv, cwd=None):
    return fx["zygote"].run("evaluate.py", ["memorization", *map(str, argv)], cwd or fx["root"], timeout=120)


def test_finds_the_planted_copies(fx):
    job = memorization(fx, "--run", fx["run"], "--data", EXAMPLE_NPZ, "--classifier", fx["clf"])
    assert job.returncode == 0, job.stderr
    assert "near-copies" in job.stdout
    out = fx["run"] / "memorization"
    result = json.loads((out / "memorization.json").read_text())
    gen, real = result["generated"], result["real_test"]
    assert gen["n"] == sum(NOISE.values()) + 2 and gen["near_copies"] == 2
    assert result["threshold"] == COPY_THRESHOLD and result["compared_at_side"] == [28, 64]
    with open(out / "nearest.csv", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    for file, index in fx["planted"].items():
        assert int(rows[file]["nearest_train_index"]) == index
        assert float(rows[file]["pixel_rms"]) < 1e-4
        assert int(rows[file]["feature_nearest_train_index"]) == index
        assert float(rows[file]["feature_cosine"]) < 1e-4
    for file, r in rows.items():
        if file not in fx["planted"]:
            assert float(r["pixel_rms"]) > COPY_THRESHOLD, file
    # unseen real tissue is not a copy: the yardstick is far above the threshold, and nothing below it
    assert real["n"] == 100 and real["near_copies"] == 0
    assert real["pixel_rms"]["min"] > COPY_THRESHOLD and real["pixel_rms"]["median"] > 10 * COPY_THRESHOLD
    assert result["ratio"]["pixel_rms"] == pytest.approx(gen["pixel_rms"]["median"] / real["pixel_rms"]["median"])
    with Image.open(out / "closest_pairs.png") as im:
        assert im.height == len(rows) * 112 and im.width > 2 * 112   # one pair per row, labels on the left
    # the report's own folder (it holds a PNG) is not taken for a class by the next evaluation
    again = memorization(fx, "--run", fx["run"], "--data", EXAMPLE_NPZ, "--classifier", fx["clf"])
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "memorization.json").read_text())["generated"]["n"] == gen["n"]


def test_one_feature_per_image_with_a_tta_validator():
    from _helpers_reject import new_classifier
    clf = new_classifier()
    clf.tta = True   # eight views per image: the fc hook fires eight times
    x = load_split(EXAMPLE_NPZ, "test").images[:5]
    f = image_features(ClassifierFeatures(clf), x)
    assert f.shape == (5, 512)
    # the mean over the views of the square's symmetries: a rotated copy has the same features
    np.testing.assert_allclose(image_features(ClassifierFeatures(clf), torch.rot90(x, 1, dims=(2, 3))), f,
                               rtol=1e-4, atol=1e-5)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_bad_input_is_one_line_and_exit_2(fx, tmp_path):
    kept_none = tmp_path / "kept_none"
    kept_none.mkdir()
    (kept_none / "manifest.csv").write_text(
        "file,class_index,class_name,prompt,seed,attempt,predicted_index,prob_prompted,accepted\n"
        ",0,adipose,p,1,1,2,0.1,0\n")
    d = load_split(EXAMPLE_NPZ, "test")
    no_train = write_npz(str(tmp_path / "no_train.npz"), test_images=d.images[:4].permute(0, 2, 3, 1).numpy(),
                         test_labels=d.labels[:4].numpy())
    clf, run = fx["clf"], fx["run"]
    cases = [
        (["--run", tmp_path / "nope", "--data", EXAMPLE_NPZ, "--classifier", clf], r"nope: not a folder"),
        (["--run", kept_none, "--data", EXAMPLE_NPZ, "--classifier", clf], r"no kept images"),
        (["--run", run, "--data", no_train, "--classifier", clf, "--out", tmp_path / "o"],
         r"no_train\.npz: missing key 'train_images'"),
        (["--run", run, "--data", EXAMPLE_NPZ, "--out", tmp_path / "o"], r"no run\.json naming its validator"),
        (["--run", run, "--data", EXAMPLE_NPZ, "--classifier", clf, "--copy-threshold", "0"],
         r"--copy-threshold 0\.0: must lie between 0 and 1"),
    ]
    jobs = fx["zygote"].run_many([dict(script="evaluate.py", argv=["memorization", *map(str, a)], cwd=str(tmp_path))
                                  for a, _ in cases], timeout=120)
    for (argv, pattern), job in zip(cases, jobs):
        lines = job.stderr.strip().splitlines()
        assert job.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, job.stderr)
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert "Traceback" not in job.stderr
    assert not (tmp_path / "o").exists() and not (kept_none / "memorization").exists()
