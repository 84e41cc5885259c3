"""evaluate.py study: the quick study on the tiny SD runs end to end, every table has its rows, and
every number of study.md equals the one in the file of the arm it names."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quick recipe's rows, counted by hand from issue 15's arms: two seeds x (base, LoRA, loop) +
# two paper rows; 9 classes; steps 0 / 20 / 40; K = 1, 4, 8, 16 + all; N = 0, 2, 4; four loops.
ROWS = {"headline": 8, "per_class": 9, "sweep": 3, "few_shot": 5, "targets": 2, "utility_n": 3, "imbalanced": 2,
        "seed_001_utility": 2, "prior": 2, "validators": 2, "gan": 2, "loops": 4}


def small_npz(path, per_split=(("train", 16), ("val", 4), ("test", 4))):
    """The bundled subset cut to 16 / 4 / 4 images per class: K = 16 still fits, classifiers train fast."""
    import numpy as np
    real, arrays = np.load(os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")), {}
    for split, n in per_split:
        labels = real[f"{split}_labels"].ravel()
        rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(9)]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = real[f"{split}_images"][rows], real[f"{split}_labels"][rows]
    np.savez(path, **arrays)
    return path


def study(out, *extra):
    return subprocess.run([sys.executable, "evaluate.py", "study", "--quick", "--preset", "tiny", "--out", str(out),
                           "--data", str(out.parent / "small.npz"), "--in-process", *extra],
                          cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    small_npz(out.parent / "small.npz")
    done = study(out)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "study.json") as f:
        doc = json.load(f)
    with open(out / "study.md") as f:
        md = f.read()
    return out, doc, md, done.stdout


def read(out, file, keys):
    with open(os.path.join(out, file)) as f:
        value = json.load(f)
    for k in keys:
        value = value[k]
    return value


def md_rows(md, title):
    """The data rows of the markdown table under the heading `## title`, as lists of cells."""
    block = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_every_table_has_its_rows(quick):
    out, doc, md, _ = quick
    tables = {t["key"]: t for t in doc["tables"]}
    assert {k: len(t["rows"]) for k, t in tables.items()} == ROWS
    for t in doc["tables"]:
        assert len(md_rows(md, t["title"])) == len(t["rows"])
        assert all(len(row) == len(t["head"]) for row in t["rows"])


def test_every_number_equals_its_arm_file(quick):
    out, doc, md, _ = quick
    checked = 0
    for t in doc["tables"]:
        for cells, md_cells in zip(t["rows"], md_rows(md, t["title"])):
            for cell, shown in zip(cells, md_cells):
                if "text" in cell:
                    assert shown == cell["text"]
                    continue
                values = []
                for src in cell["sources"]:
                    try:
                        values.append(read(out, src["file"], src["keys"]))
                    except (KeyError, IndexError, TypeError, FileNotFoundError):
                        values.append(None)
                if any(v is None for v in values):
                    assert cell["value"] is None and shown == "n/a", (t["key"], cell)
                    continue
                expected = {None: lambda a: a, "ratio": lambda a, b: a / b, "points": lambda a, b: 100 * (a - b)}
                expected = expected[cell["op"]](*values)
                assert math.isclose(cell["value"], expected, rel_tol=1e-12, abs_tol=1e-12), (t["key"], cell)
                assert shown == format(expected, cell["format"]), (t["key"], shown, expected)
                checked += 1
    assert checked > 100  # most cells of the tiny study hold a number


def test_cells_read_the_right_files(quick):
    """Spot checks of the mapping itself, written from the issue's table definitions."""
    out, doc, md, _ = quick
    rows = md_rows(md, next(t["title"] for t in doc["tables"] if t["key"] == "headline"))
    lora_first = next(r for r in rows if r[0] == "mini + LoRA, first attempt" and r[1] == "0")
    assert lora_first[4] == format(read(out, "000_lora/metrics.json", ["f1_macro"]), ".3f")
    base = next(r for r in rows if r[0] == "base mini, first attempt" and r[1] == "1")
    assert base[2] == format(read(out, "seed1/000_base/metrics.json", ["precision_macro"]), ".3f")
    loops = md_rows(md, next(t["title"] for t in doc["tables"] if t["key"] == "loops"))
    run = read(out, "loop_one_at_a_time/run.json", [])
    kept = sum(run["kept_per_class"].values())
    assert loops[0][3] == format(run["costs"]["unet_evals"] / kept, ".1f")
    util = md_rows(md, next(t["title"] for t in doc["tables"] if t["key"] == "utility_n"))
    assert util[0][2] == format(read(out, "003_utility_n0/utility.json", ["real", "accuracy"]), ".3f")
    assert util[2][2] == format(read(out, "003_utility_n4/utility.json", ["hybrid", "accuracy"]), ".3f")


def test_rerun_resumes_and_other_settings_are_refused(quick):
    out, doc, md, first_stdout = quick
    assert first_stdout.count("== arm") == len(doc["arm_seconds"])
    again = study(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== arm" not in again.stdout  # every arm finished: nothing runs again
    other = study(out, "--seed", "1")
    assert other.returncode == 2
    rel = os.path.relpath(out, ROOT)  # the study speaks in paths from the repository root, as its commands do
    assert other.stderr.strip().splitlines() == [f"error: {rel} holds a study with other settings "
                                                 f"({os.path.join(rel, 'recipe.json')}): use another --out"]


def test_imbalanced_copy_cuts_only_the_named_classes(tmp_path):
    import numpy as np
    from model.study.imbalance import write_imbalanced
    src = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
    counts = write_imbalanced(src, (0, 4), 5, 3, str(tmp_path / "cut.npz"))
    real, cut = np.load(src), np.load(tmp_path / "cut.npz")
    before = np.bincount(real["train_labels"].ravel(), minlength=9)
    after = np.bincount(cut["train_labels"].ravel(), minlength=9)
    assert after[0] == after[4] == 5 and counts[0] == counts[4] == 5
    assert all(after[c] == before[c] for c in range(9) if c not in (0, 4))
    for split in ("val", "test"):  # measured on every real image, as before
        assert np.array_equal(cut[f"{split}_images"], real[f"{split}_images"])
    # every kept image is one of the originals of its class
    originals = {(label, img.tobytes()) for img, label in zip(real["train_images"], real["train_labels"].ravel())}
    assert all((label, img.tobytes()) in originals for img, label in zip(cut["train_images"], cut["train_labels"].ravel()))


def test_synthetic_per_class_takes_the_first_n_of_each_class(tmp_path):
    from PIL import Image
    from model.eval.utility import synthetic_set
    classes = ["adipose", "background"]
    for c in classes:
        os.makedirs(tmp_path / c)
        for i in range(4):
            Image.new("RGB", (8, 8), (10 * i, 0, 0) if c == "adipose" else (0, 10 * i, 0)).save(tmp_path / c / f"{c}_{i:04d}.png")
    two = synthetic_set(str(tmp_path), classes, 8, per_class=2)
    assert two.labels.tolist() == [0, 0, 1, 1]
    assert two.images[:, 0, 0, 0].tolist() == [0, 10, 0, 0] and two.images[:, 1, 0, 0].tolist() == [0, 0, 0, 10]
    assert len(synthetic_set(str(tmp_path), classes, 8)) == 8
