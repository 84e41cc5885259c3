"""model/data.py: the released npz layout, class folders, the official download, few-shot, errors."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import data as D
from model.io import UserError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
# MedMNIST's own label spellings (INFO["pathmnist"]["label"]), in PathMNIST's label order.
MEDMNIST_LABELS = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                   "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]


@pytest.fixture(scope="module")
def raw():
    with np.load(SUBSET) as f:
        return {k: f[k] for k in f.files}


def write_folder(root, images, labels, classes):
    """Images (N, S, S, 3) uint8 as PNGs under root/<class>/<index>.png."""
    for i, (im, y) in enumerate(zip(images, labels.reshape(-1))):
        os.makedirs(root / classes[y], exist_ok=True)
        Image.fromarray(im).save(root / classes[y] / f"{i:04d}.png")


def run_cli(monkeypatch, capsys, argv):
    """Run a script's main() through model.io.cli exactly as its __main__ does; (exit code, stderr)."""
    import train_classifier
    monkeypatch.setattr(sys, "argv", ["train_classifier.py"] + argv)
    with pytest.raises(SystemExit) as e:
        cli(train_classifier.main)
    return e.value.code, capsys.readouterr().err


def test_npz_loads_released_layout(raw):
    for split in D.SPLITS:
        s = D.load_split(SUBSET, split)
        want = torch.from_numpy(raw[f"{split}_images"]).permute(0, 3, 1, 2)
        assert s.images.dtype == torch.uint8 and s.images.shape == want.shape
        assert torch.equal(s.images, want)
        assert s.labels.dtype == torch.int64 and s.labels.tolist() == raw[f"{split}_labels"].ravel().tolist()
        assert s.classes == D.PATHMNIST_CLASSES
        assert s.fingerprint == hashlib.md5(open(SUBSET, "rb").read()).hexdigest()


def test_folder_reads_to_the_same_tensors_as_the_npz(tmp_path, raw):
    for split in ("train", "test"):
        write_folder(tmp_path / split, raw[f"{split}_images"], raw[f"{split}_labels"], D.PATHMNIST_CLASSES)
    folder, npz = D.load_split(tmp_path, "test"), D.load_split(SUBSET, "test")
    # The folder is read class by class, files in name order (= npz index): a stable sort by label.
    order = torch.sort(npz.labels, stable=True).indices
    assert folder.classes == D.PATHMNIST_CLASSES
    assert torch.equal(folder.labels, npz.labels[order])
    assert torch.equal(folder.images, npz.images[order])
    with pytest.raises(UserError, match="no 'val'"):
        D.load_split(tmp_path, "val")


def test_flat_folder_split_is_stratified_disjoint_and_seed_independent(tmp_path, raw):
    write_folder(tmp_path, raw["train_images"][:120], raw["train_labels"][:120], D.PATHMNIST_CLASSES)
    parts = {s: D.load_split(tmp_path, s, seed=0) for s in D.SPLITS}
    again = D.load_split(tmp_path, "test", seed=123)
    assert torch.equal(again.images, parts["test"].images)  # --seed never moves images between splits
    keys = {s: {bytes(im.numpy()) for im in p.images} for s, p in parts.items()}
    assert sum(len(p) for p in parts.values()) == 120
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["val"]) and not (keys["val"] & keys["test"])
    counts = np.bincount(raw["train_labels"][:120].ravel(), minlength=9)
    test_counts = torch.bincount(parts["test"].labels, minlength=9).numpy()
    assert (test_counts >= 1).all() and (np.abs(test_counts - 0.15 * counts) <= 1).all()
    assert len({p.fingerprint for p in parts.values()}) == 1  # one fingerprint for the whole folder


def test_folders_named_with_medmnist_spellings_are_pathmnist(tmp_path, raw):
    # Spaces, hyphens, underscores, any case: each is an alias of our class name.
    spellings = ["Adipose", "BACKGROUND", "debris", "Lymphocytes", "mucus", "Smooth Muscle",
                 "normal colon mucosa", "Cancer-Associated Stroma", "colorectal adenocarcinoma_epithelium"]
    write_folder(tmp_path / "all" / "test", raw["test_images"], raw["test_labels"], spellings)
    folder, npz = D.load_split(tmp_path / "all", "test"), D.load_split(SUBSET, "test")
    order = torch.sort(npz.labels, stable=True).indices
    assert folder.classes == D.PATHMNIST_CLASSES  # PathMNIST's indices, not alphabetical ones
    assert torch.equal(folder.labels, npz.labels[order]) and torch.equal(folder.images, npz.images[order])
    ours = D.class_prompts(D.PATHMNIST_CLASSES)
    assert D.class_prompts(folder.classes) == ours and D.class_prompts(MEDMNIST_LABELS) == ours
    assert not any("colorectal colorectal" in p for p in D.class_prompts(MEDMNIST_LABELS))
    # A few of the classes only: still our names (and our prompts); other names stay as they are.
    keep = np.isin(raw["val_labels"].ravel(), [5, 7])
    write_folder(tmp_path / "some", raw["val_images"][keep], raw["val_labels"][keep], spellings)
    os.makedirs(tmp_path / "some" / "Kidney Cortex")
    Image.fromarray(raw["val_images"][0]).save(tmp_path / "some" / "Kidney Cortex" / "0.png")
    assert D.load_split(tmp_path / "some", "train").classes == ["Kidney Cortex", "cancer_associated_stroma",
                                                                "smooth_muscle"]
    # An npz naming its classes the MedMNIST way reads as PathMNIST too.
    np.savez(tmp_path / "t.npz", test_images=raw["test_images"], test_labels=raw["test_labels"],
             classes=np.array(MEDMNIST_LABELS))
    assert D.load_split(tmp_path / "t.npz", "test").classes == D.PATHMNIST_CLASSES
    # Two folders naming one class are refused rather than merged.
    os.makedirs(tmp_path / "some" / "smooth_muscle")
    Image.fromarray(raw["val_images"][0]).save(tmp_path / "some" / "smooth_muscle" / "0.png")
    with pytest.raises(UserError, match="'Smooth Muscle' and 'smooth_muscle' both name smooth_muscle"):
        D.load_split(tmp_path / "some", "train")


def test_folder_images_are_centre_cropped_and_resized(tmp_path):
    for c, color in [("a", (255, 0, 0)), ("b", (0, 0, 255))]:
        for i in range(3):
            im = np.zeros((40, 60, 3), np.uint8)
            im[:, 10:50] = color  # the centre 40 x 40 square is one colour, the side bands black
            os.makedirs(tmp_path / "train" / c, exist_ok=True)
            Image.fromarray(im).save(tmp_path / "train" / c / f"{i}.png")
    s = D.load_split(tmp_path, "train", size=16)
    assert s.images.shape == (6, 3, 16, 16) and s.classes == ["a", "b"]
    assert (s.images[s.labels == 0][:, 0] == 255).all() and (s.images[s.labels == 0][:, 2] == 0).all()
    assert (s.images[s.labels == 1][:, 2] == 255).all()


def test_size_resizes_with_antialiasing():
    s = D.load_split(SUBSET, "val", size=64)
    assert s.images.shape == (100, 3, 64, 64)
    small = D.load_split(SUBSET, "val", size=14).images.float()
    full = D.load_split(SUBSET, "val").images.float()
    # Antialiased 2x downsampling is close to 2x2 block averaging; plain subsampling would not be.
    block = full.reshape(100, 3, 14, 2, 14, 2).mean(dim=(3, 5))
    assert (small - block).abs().mean() < 4
    assert (small - full[..., ::2, ::2]).abs().mean() > (small - block).abs().mean() * 2


def test_few_shot_takes_k_per_class_chosen_by_seed():
    a, b, c = (D.load_split(SUBSET, "train", few_shot=5, seed=s) for s in (0, 0, 1))
    assert torch.bincount(a.labels, minlength=9).tolist() == [5] * 9
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(UserError, match="class 'normal_colon_mucosa' has only 33"):
        D.load_split(SUBSET, "train", few_shot=34)


def test_prompts_and_class_resolution():
    prompts = D.class_prompts(D.PATHMNIST_CLASSES)
    assert len(set(prompts)) == 9 and all("H&E" in p for p in prompts)
    assert D.class_prompts(["basal_cell_carcinoma"], "a photo of {desc} ({name})") == \
        ["a photo of basal cell carcinoma (basal_cell_carcinoma)"]
    with pytest.raises(UserError, match="only {desc} and {name}"):
        D.class_prompts(["x"], "{organ}")
    assert D.resolve_classes(["mucus", "0", 8], D.PATHMNIST_CLASSES) == [4, 0, 8]
    with pytest.raises(UserError, match="unknown class 'tumour'; known: adipose"):
        D.resolve_classes(["tumour"], D.PATHMNIST_CLASSES)
    with pytest.raises(UserError, match="unknown class '9'"):
        D.resolve_classes(["9"], D.PATHMNIST_CLASSES)


def test_test_only_npz_and_named_classes(tmp_path, raw):
    path = tmp_path / "t.npz"
    np.savez(path, test_images=raw["test_images"][:10, :, :, 0], test_labels=raw["test_labels"][:10] % 2,
             classes=np.array(["x", "y"]))
    s = D.load_split(path, "test")  # grayscale (N, S, S) becomes 3 equal channels
    assert s.classes == ["x", "y"] and s.images.shape == (10, 3, 28, 28)
    assert torch.equal(s.images[:, 0], s.images[:, 2])


def test_official_download_checks_md5_and_caches(tmp_path, monkeypatch, raw):
    md5 = hashlib.md5(open(SUBSET, "rb").read()).hexdigest()
    url = "file://" + os.path.abspath(SUBSET)
    monkeypatch.setitem(D.PATHMNIST_FILES, "pathmnist", (url, md5))
    s = D.load_split("pathmnist", "val", cache_dir=tmp_path / "cache")
    assert s.fingerprint == md5 and s.source == "pathmnist" and len(s) == 100
    assert os.listdir(tmp_path / "cache") == ["pathmnist.npz"]
    monkeypatch.setitem(D.PATHMNIST_FILES, "pathmnist_64", (url, "0" * 32))
    with pytest.raises(UserError, match="MD5 .* expected 0{32}"):
        D.load_split("pathmnist_64", "val", cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == ["pathmnist.npz"]  # the bad download was not kept
    monkeypatch.setitem(D.PATHMNIST_FILES, "pathmnist_128", ("http://127.0.0.1:9/pathmnist_128.npz", md5))
    with pytest.raises(UserError, match=r"cannot download pathmnist_128.npz .* put it at .*cache/pathmnist_128.npz"):
        D.load_split("pathmnist_128", "val", cache_dir=tmp_path / "cache")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, raw):
    # A cached official file with the wrong MD5.
    monkeypatch.setenv("MEDSYNTH_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    (tmp_path / "cache" / "pathmnist.npz").write_bytes(b"not the real file")
    # A missing key, labels out of range, an empty class folder.
    np.savez(tmp_path / "nolabels.npz", train_images=raw["train_images"][:4])
    np.savez(tmp_path / "range.npz", **{f"{s}_images": raw["train_images"][:4] for s in ("train", "val")},
             **{f"{s}_labels": np.array([[0], [3], [9], [1]]) for s in ("train", "val")})
    write_folder(tmp_path / "folder", raw["train_images"][:20], raw["train_labels"][:20], D.PATHMNIST_CLASSES)
    os.makedirs(tmp_path / "folder" / "empty_class")
    cases = [("pathmnist", "expected a8b06965200029087d5bd730944a56c1"),
             (str(tmp_path / "nolabels.npz"), "missing key 'train_labels'"),
             (str(tmp_path / "range.npz"), "train_labels out of range: found 0..9, expected 0..8"),
             (str(tmp_path / "folder"), "empty_class: class folder holds no images")]
    for spec, message in cases:
        code, err = run_cli(monkeypatch, capsys, ["--data", spec, "--out", str(tmp_path / "out")])
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")  # nothing written on bad input


def test_real_process_exit_code_and_single_line(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 8, 8, 3), np.uint8))
    r = subprocess.run([sys.executable, "train_classifier.py", "--data", str(tmp_path / "bad.npz"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing key 'train_labels'" in r.stderr
