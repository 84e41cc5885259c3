"""evaluate.py compare: two run folders written by hand with round numbers, the table checked
against values computed by hand, missing evaluations as n/a, and bad input as one line + exit 2."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from model.eval.compare import compare, format_compare
from model.eval.fidelity import ClassifierFeatures
from model.io import UserError, write_json
from model.reject.run_folder import write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def manifest(folder, n_rows):
    write_manifest(folder, [{"file": "", "class_index": 0, "class_name": "adipose", "prompt": "p", "seed": i,
                             "attempt": 1, "predicted_index": 0, "prob_prompted": 0.9, "accepted": 0, "index": i}
                            for i in range(n_rows)])


def full_run(folder):
    """A sample_validated.py folder with every evaluation at its default place.
    4 kept of 10 candidates, 1000 UNet and 12 VAE evaluations, 20 s."""
    manifest(folder, 10)
    write_json(os.path.join(folder, "run.json"), {
        "status": "complete", "kept_per_class": {"adipose": 3, "background": 1},
        "costs": {"candidates": 10, "unet_evals": 1000, "vae_evals": 12, "generator_evals": 0},
        "seconds_total": 20.0})
    write_json(os.path.join(folder, "metrics.json"), {
        "source": "manifest", "precision_macro": 0.5, "recall_macro": 0.25, "f1_macro": 0.375,
        "second_judge": {"arch": "vit", "agreement": 0.75, "kept": 4}})
    write_json(os.path.join(folder, "fidelity.json"), {
        ClassifierFeatures.name: {"overall": {"frechet_distance": 12.5}},
        "inception": {"overall": {"frechet_distance": 999.0}}})  # another feature space: not this column
    write_json(os.path.join(folder, "memorization", "memorization.json"), {
        "generated": {"n": 4, "near_copies": 1, "pixel_rms": {"median": 0.125}},
        "real_test": {"n": 100, "near_copies": 0, "pixel_rms": {"median": 0.5}}})
    write_json(os.path.join(folder, "utility", "utility.json"), {
        "real": {"accuracy": 0.625}, "synthetic": {"accuracy": 0.25}, "hybrid": {"accuracy": 0.6875}})


def sparse_run(root):
    """A run.sh folder: samples/ with only the manifest and a run.json of an older version (no
    unet/vae counts, no seconds_total); memorization/ beside samples/, as run.sh puts it.
    8 candidates for 5 kept."""
    samples = os.path.join(root, "samples")
    manifest(samples, 8)
    write_json(os.path.join(samples, "run.json"), {"status": "complete", "kept_per_class": {"adipose": 5},
                                                   "costs": {"candidates": 8}})
    write_json(os.path.join(root, "memorization", "memorization.json"), {
        "generated": {"n": 5, "near_copies": 0, "pixel_rms": {"median": 0.25}}})


def test_table_matches_hand_computed_values(tmp_path):
    full_run(str(tmp_path / "sd"))
    sparse_run(str(tmp_path / "mini"))
    out = tmp_path / "cmp"
    r = evaluate("compare", str(tmp_path / "sd"), str(tmp_path / "mini"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    runs = json.load(open(out / "compare.json"))["runs"]
    assert [x["name"] for x in runs] == ["sd", "mini"]
    sd, mini = runs
    assert sd["kept"] == 4 and mini["kept"] == 5
    assert (sd["precision_macro"], sd["recall_macro"], sd["f1_macro"]) == (0.5, 0.25, 0.375)
    assert sd["second_judge"] == 0.75 and sd["second_judge_arch"] == "vit"
    assert sd["frechet"] == 12.5
    assert (sd["memo_median"], sd["near_copies"], sd["memo_n"]) == (0.125, 1, 4)
    assert sd["utility_gain"] == 6.25   # 100 x (0.6875 - 0.625)
    # per kept image: 10 / 4 attempts, 1000 / 4 UNet, 12 / 4 VAE, 0 / 4 generator, 20 / 4 seconds
    assert sd["attempts_per_kept"] == 2.5 and sd["unet_per_kept"] == 250.0 and sd["vae_per_kept"] == 3.0
    assert sd["generator_per_kept"] == 0.0 and sd["seconds_per_kept"] == 5.0
    # the run.sh folder: its memorisation found beside samples/, 8 / 5 attempts, the rest missing
    assert (mini["memo_median"], mini["near_copies"]) == (0.25, 0) and mini["attempts_per_kept"] == 1.6
    for key in ("precision_macro", "recall_macro", "f1_macro", "second_judge", "frechet", "utility_gain", "unet_per_kept",
                "vae_per_kept", "generator_per_kept", "seconds_per_kept"):
        assert mini[key] is None, key
    table = (out / "compare.md").read_text().splitlines()
    assert table[2] == ("| sd | 4 | 0.500 | 0.250 | 0.375 | 0.750 | 12.5 | 0.1250 | 1 | +6.2 | 2.50 | 250.0 | 3.00 "
                        "| 0.00 | 5.00 |")
    assert table[3] == "| mini | 5 | n/a | n/a | n/a | n/a | n/a | 0.2500 | 0 | n/a | 1.60 | n/a | n/a | n/a | n/a |"
    assert len(table[0].split("|")) == len(table[2].split("|"))  # as many titles as cells
    assert any("seconds_total" in line for line in table[4:])  # every column says where it comes from
    with Image.open(out / "compare.png") as im:
        assert im.width > 300 and im.height > 200


def test_names_and_classified_metrics(tmp_path):
    full_run(str(tmp_path / "a"))
    # metrics.json of `evaluate.py generation --classifier`: the kept images classified, no first attempts
    write_json(str(tmp_path / "a" / "metrics.json"), {"source": "classified", "f1_macro": 1.0,
                                                      "second_judge": {"agreement": 0.5, "arch": "vit"}})
    (row,) = compare([str(tmp_path / "a")], ["SD + LoRA"])
    assert row["name"] == "SD + LoRA" and row["f1_macro"] is None and row["second_judge"] == 0.5
    assert "| SD + LoRA | 4 | n/a | n/a | n/a | 0.500 |" in format_compare([row])
    with pytest.raises(UserError, match="2 names for 1 runs"):
        compare([str(tmp_path / "a")], ["x", "y"])


def test_kept_zero_and_unfinished_run_are_n_a(tmp_path):
    folder = str(tmp_path / "r")
    manifest(folder, 3)
    write_json(os.path.join(folder, "run.json"), {"status": "running"})  # killed before finishing
    (row,) = compare([folder])
    assert row["kept"] is None and row["attempts_per_kept"] is None and row["status"] == "running"
    write_json(os.path.join(folder, "run.json"), {"kept_per_class": {"adipose": 0}, "costs": {"candidates": 3}})
    (row,) = compare([folder])
    assert row["kept"] == 0 and row["attempts_per_kept"] is None


@pytest.mark.parametrize("case", ["not_a_run", "missing", "bad_json", "names"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    good = tmp_path / "good"
    full_run(str(good))
    target = tmp_path / "target"
    extra = ["--out", str(tmp_path / "o")]
    if case == "not_a_run":
        (target / "adipose").mkdir(parents=True)  # a folder of images is not a run
    elif case == "bad_json":
        manifest(str(target), 2)
        (target / "run.json").write_text("{not json")
    elif case == "names":
        target, extra = good, [*extra, "--names", "only-one"]
    r = evaluate("compare", str(good), str(target), *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
