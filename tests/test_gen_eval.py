"""evaluate.py generation / fidelity / utility: the metrics against hand-computed values on a
fixture manifest, folders of images made elsewhere, and the Frechet distance against scipy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers_reject import always, new_classifier, save
from model.data import PATHMNIST_CLASSES
from model.validator.classifier import load_classifier
from model.validator.train import Recipe
from model.data import load_split
from model.eval.fidelity import ClassifierFeatures, fidelity, frechet_distance, gaussian
from model.eval.generation import folder_metrics, image_files, manifest_metrics
from model.eval.inception import FIDInceptionA, FIDInceptionE2, InceptionFeatures, fid_inception
from model.io import UserError, write_json
from model.reject.run_folder import write_manifest
from model.eval.utility import utility

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")

# (class, index) -> predictions of attempts 1, 2, ...; the last one of a list is accepted when it
# equals the class. max_attempts is 3: lymphocytes #3 runs out of attempts.
FIXTURE = {
    (0, 0): [0], (0, 1): [0], (0, 2): [0], (0, 3): [3, 0],
    (3, 0): [3], (3, 1): [3], (3, 2): [6, 3], (3, 3): [8, 8, 0],
    (6, 0): [6], (6, 1): [3, 6], (6, 2): [6], (6, 3): [6],
}


def evaluate(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def fixture_run(folder):
    rows = []
    for (c, i), preds in FIXTURE.items():
        for a, p in enumerate(preds, start=1):
            rows.append({"file": f"{PATHMNIST_CLASSES[c]}/{i}.png" if p == c else "", "class_index": c,
                         "class_name": PATHMNIST_CLASSES[c], "prompt": "p", "seed": 100 * c + 10 * i + a,
                         "attempt": a, "predicted_index": p, "prob_prompted": 0.9 if p == c else 0.1,
                         "accepted": int(p == c), "index": i})
    write_manifest(folder, rows)
    write_json(os.path.join(folder, "run.json"), {"settings": {"max_attempts": 3}, "classes": PATHMNIST_CLASSES})


def test_generation_metrics_match_hand_computed_confusion(tmp_path):
    fixture_run(str(tmp_path))
    r = evaluate("generation", "--run", str(tmp_path))
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "metrics.json"))
    # first attempts, rows = prompted: adipose 3 right + 1 as lymphocytes; lymphocytes 2 right,
    # 1 as normal mucosa, 1 as adenocarcinoma; normal mucosa 3 right + 1 as lymphocytes
    expected = np.zeros((9, 9), int)
    expected[0, 0], expected[0, 3] = 3, 1
    expected[3, 3], expected[3, 6], expected[3, 8] = 2, 1, 1
    expected[6, 6], expected[6, 3] = 3, 1
    assert np.array_equal(np.array(m["confusion"]), expected)
    per = {p["name"]: p for p in m["per_class"]}
    assert set(per) == {"adipose", "lymphocytes", "normal_colon_mucosa"}
    # precision = TP / column sum, recall = TP / row sum
    assert per["adipose"]["precision"] == pytest.approx(3 / 3) and per["adipose"]["recall"] == pytest.approx(3 / 4)
    assert per["lymphocytes"]["precision"] == pytest.approx(2 / 4) and per["lymphocytes"]["recall"] == pytest.approx(2 / 4)
    assert per["normal_colon_mucosa"]["precision"] == pytest.approx(3 / 4)
    f1 = [2 * 1 * 0.75 / 1.75, 0.5, 0.75]
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0.75) / 3)
    assert m["recall_macro"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    y_true = [c for (c, _), p in FIXTURE.items()]
    y_pred = [p[0] for p in FIXTURE.values()]
    p, rc, f, _ = sklearn.precision_recall_fscore_support(y_true, y_pred, labels=[0, 3, 6], average="macro",
                                                          zero_division=0)
    assert (m["precision_macro"], m["recall_macro"], m["f1_macro"]) == pytest.approx((p, rc, f))

    assert per["lymphocytes"]["candidates"] == 7 and per["lymphocytes"]["kept"] == 3
    assert per["lymphocytes"]["acceptance_rate"] == pytest.approx(3 / 7)
    assert per["lymphocytes"]["mean_attempts"] == pytest.approx((1 + 1 + 2) / 3)
    assert per["adipose"]["hit_max_attempts"] == 0 and per["lymphocytes"]["hit_max_attempts"] == 1
    a = m["acceptance"]
    assert (a["candidates"], a["kept"], a["max_attempts"]) == (17, 11, 2)
    assert a["mean_attempts"] == pytest.approx(14 / 11)
    assert a["classes_hit_max_attempts"] == {"lymphocytes": 1}
    assert "0.702" in r.stdout  # the printed table carries the macro F1
    assert Image.open(tmp_path / "confusion.png").size[0] > 200


def write_images(folder, images):
    """images: {class folder name: uint8 (N, 3, S, S)} -> PNG files."""
    for name, arr in images.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for k, x in enumerate(arr):
            Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())).save(os.path.join(folder, name, f"{k}.png"))


def test_generation_on_a_folder_made_elsewhere(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = {"adipose": torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=g),
            "mucus": torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8, generator=g)}
    write_images(str(tmp_path / "gen"), imgs)
    clf = save(always(0), str(tmp_path / "always0.safetensors"))
    r = evaluate("generation", "--run", str(tmp_path / "gen"), "--classifier", clf, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "gen" / "metrics.json"))
    assert np.array(m["confusion"])[[0, 4], 0].tolist() == [3, 2] and np.array(m["confusion"]).sum() == 5
    assert m["precision_macro"] == pytest.approx((3 / 5 + 0) / 2)
    assert m["recall_macro"] == pytest.approx((1 + 0) / 2)
    assert m["f1_macro"] == pytest.approx((2 * 0.6 / 1.6 + 0) / 2)

    with pytest.raises(UserError, match="--classifier"):
        manifest_metrics(str(tmp_path / "gen"))  # no manifest, no validator: nothing to read
    write_images(str(tmp_path / "gen"), {"kidney": imgs["mucus"]})
    with pytest.raises(UserError, match="kidney"):
        folder_metrics(str(tmp_path / "gen"), always(0))


def test_generation_folders_may_use_medmnist_spellings(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["Smooth Muscle", "cancer-associated stroma", "COLORECTAL ADENOCARCINOMA EPITHELIUM", "normal_colon_mucosa"]
    write_images(str(tmp_path), {n: torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=g) for n in names})
    assert sorted(k for _, k in image_files(str(tmp_path), PATHMNIST_CLASSES)) == [5, 6, 7, 8]


def test_frechet_distance_against_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 1.5
    (m1, s1), (m2, s2) = gaussian(a), gaussian(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(m1, s1, m1 + 2.0, s1) == pytest.approx(6 * 4.0, abs=1e-6)  # same shape, shifted


def real_images(c, split="test"):
    d = np.load(SUBSET)
    x = torch.from_numpy(d[f"{split}_images"]).permute(0, 3, 1, 2)
    return x[torch.from_numpy(d[f"{split}_labels"].reshape(-1) == c)]


def test_fidelity_is_zero_for_the_real_images_and_grows_for_noise(tmp_path):
    write_images(str(tmp_path / "same"), {"adipose": real_images(0), "debris": real_images(2)})
    g = torch.Generator().manual_seed(1)
    noise = {n: torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8, generator=g) for n in ("adipose", "debris")}
    write_images(str(tmp_path / "noise"), noise)
    clf = new_classifier()
    r = evaluate("fidelity", "--run", str(tmp_path / "same"), "--data", SUBSET, "--split", "test",
                 "--classifier", save(clf, str(tmp_path / "clf.safetensors")), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "not Inception FID" in r.stdout
    (same,) = [v for k, v in json.load(open(tmp_path / "same" / "fidelity.json")).items() if "validator" in k]
    noisy = fidelity(str(tmp_path / "noise"), image_files(str(tmp_path / "noise"), PATHMNIST_CLASSES),
                     load_split(SUBSET, "test"), [ClassifierFeatures(clf)], PATHMNIST_CLASSES)
    (noisy,) = noisy.values()
    assert set(same["per_class"]) == {"adipose", "debris"}
    assert same["overall"]["n_real"] == len(real_images(0)) + len(real_images(2))  # only the generated classes
    for c in ("adipose", "debris"):
        assert abs(same["per_class"][c]["frechet_distance"]) < 1e-6 * noisy["per_class"][c]["frechet_distance"]
    assert noisy["overall"]["frechet_distance"] > 1e3 * abs(same["overall"]["frechet_distance"])


def test_features_of_an_averaging_validator_are_one_row_per_image_and_orientation_free():
    clf = new_classifier()
    clf.tta = True  # predict_proba runs fc once per rotation/flip: 8 hook outputs per image
    images = real_images(0)[:5]
    feats = ClassifierFeatures(clf)(images)
    assert feats.shape == (5, 512)
    turned = ClassifierFeatures(clf)(torch.rot90(images, 1, dims=(2, 3)).contiguous())
    np.testing.assert_allclose(turned, feats, rtol=1e-4, atol=1e-6)


def test_fidelity_floor_is_the_distance_between_the_two_real_splits(tmp_path):
    write_images(str(tmp_path / "run"), {"adipose": real_images(0), "debris": real_images(2)})
    clf = new_classifier()
    test, train = load_split(SUBSET, "test"), load_split(SUBSET, "train")
    files = image_files(str(tmp_path / "run"), PATHMNIST_CLASSES)
    (result,) = fidelity(str(tmp_path / "run"), files, test, [ClassifierFeatures(clf)], PATHMNIST_CLASSES,
                         floor=train).values()
    keep = lambda d: d.images[torch.isin(d.labels, torch.tensor([0, 2]))]  # the generated classes only
    extract = ClassifierFeatures(clf)
    want = frechet_distance(*gaussian(extract(keep(test))), *gaussian(extract(keep(train))))
    overall = result["overall"]
    assert overall["floor_frechet_distance"] == pytest.approx(want, rel=1e-9)
    assert overall["n_floor"] == len(keep(train))
    assert overall["ratio_to_floor"] == pytest.approx(overall["frechet_distance"] / want)


def test_utility_trains_three_arms_on_the_right_images(tmp_path):
    synth = {"adipose": real_images(0, "val"), "debris": real_images(2, "val")}
    write_images(str(tmp_path / "synth"), synth)
    args = ["utility", "--run", str(tmp_path / "synth"), "--data", SUBSET, "--real-fraction", "0.1",
            "--epochs", "1", "--batch-size", "16", "--image-size", "8", "--device", "cpu"]
    r = evaluate(*args)
    assert r.returncode == 0, r.stderr
    u = json.load(open(tmp_path / "synth" / "utility" / "utility.json"))
    labels = np.load(SUBSET)["train_labels"].reshape(-1)
    real_counts = [max(1, round(0.1 * (labels == c).sum())) for c in range(9)]
    assert u["real"]["n_train_per_class"] == real_counts
    assert u["synthetic"]["n_train_per_class"] == [len(synth["adipose"]), 0, len(synth["debris"])] + [0] * 6
    assert u["hybrid"]["n_train"] == u["real"]["n_train"] + u["synthetic"]["n_train"]
    for arm in ("real", "synthetic", "hybrid"):
        assert u[arm]["test"]["n"] == 100 and 0 <= u[arm]["f1_macro"] <= 1
    ckpt = u["real"]["checkpoint"]
    mtime = os.path.getmtime(ckpt)
    splits = [load_split(SUBSET, sp, size=8) for sp in ("train", "val", "test")]
    recipe = Recipe(epochs=1, batch_size=16, device="cpu")
    again = utility(str(tmp_path / "synth"), *splits, recipe, str(tmp_path / "synth" / "utility"), real_fraction=0.1)
    assert os.path.getmtime(ckpt) == mtime  # finished arms are reused, not trained again
    assert again["real"]["f1_macro"] == u["real"]["f1_macro"]


def test_utility_refuses_a_finished_arm_trained_otherwise(tmp_path):
    """A finished arm is reused only for the same settings and data, as train_classifier.py does:
    another --real-fraction into the same --out is refused (one line, exit 2, nothing written)
    unless --overwrite, which trains the arms again."""
    write_images(str(tmp_path / "synth"), {"adipose": real_images(0, "val")[:4]})
    with np.load(SUBSET) as d:  # 4 images per class and split: a quick run
        pick = {s: np.concatenate([np.flatnonzero(d[f"{s}_labels"].ravel() == c)[:4] for c in range(9)])
                for s in ("train", "val", "test")}
        np.savez(tmp_path / "small.npz", **{f"{s}_{k}": d[f"{s}_{k}"][i] for s, i in pick.items()
                                            for k in ("images", "labels")})
    out = str(tmp_path / "u")
    base = ["utility", "--run", str(tmp_path / "synth"), "--data", str(tmp_path / "small.npz"), "--epochs", "1",
            "--batch-size", "8", "--image-size", "8", "--device", "cpu", "--out", out]
    r = evaluate(*base)
    assert r.returncode == 0, r.stderr
    files = lambda: {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(out) for f in fs}
    before = files()
    r = evaluate(*base, "--real-fraction", "0.5")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "other training data" in r.stderr and "--overwrite" in r.stderr
    assert files() == before
    r = evaluate(*base, "--real-fraction", "0.5", "--overwrite")
    assert r.returncode == 0, r.stderr
    u = json.load(open(os.path.join(out, "utility.json")))
    for arm in ("real", "hybrid"):
        assert load_classifier(u[arm]["checkpoint"]).meta["n_train"] == u[arm]["n_train"]
    assert u["real"]["n_train"] == 9 * 2  # half of 4 per class


def test_inception_pools_as_tensorflow_and_loads_only_inception_weights(tmp_path):
    """pytorch-fid's network differs from torchvision's only in the pooling branch of the mixed
    blocks: an average over the pixels inside the image (zero padding not counted), and a max in
    the last block. Average-without-padding = padded average / fraction of the window inside."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    inside = torch.nn.functional.avg_pool2d(torch.ones(1, 1, 5, 5), 3, 1, 1)
    for block, pool in [(FIDInceptionA(8, 4), lambda t: torch.nn.functional.avg_pool2d(t, 3, 1, 1) / inside),
                        (FIDInceptionE2(8), lambda t: torch.nn.functional.max_pool2d(t, 3, 1, 1))]:
        block.eval()
        with torch.no_grad():
            out = block(x)
            want = block.branch_pool(pool(x))
        assert torch.allclose(out[:, -want.shape[1]:], want, atol=1e-5)

    torch.save(fid_inception().state_dict(), tmp_path / "pt_inception.pth")
    feats = InceptionFeatures(str(tmp_path / "pt_inception.pth"))
    assert "standard FID" in feats.name
    assert feats(torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)).shape == (1, 2048)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="1008"):
        InceptionFeatures(str(tmp_path / "other.pth"))
