"""report.md links exactly the stage outputs that exist and puts the run's scores beside the paper's."""
import json

from model.eval.report import PAPER, write_report


def test_report_links_existing_outputs_and_compares_with_the_paper(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "manifest.csv").write_text("file\n")
    (tmp_path / "samples" / "contact_sheet.png").write_bytes(b"png")
    (tmp_path / "samples" / "metrics.json").write_text(json.dumps({
        "precision_macro": 0.5, "recall_macro": 0.25, "f1_macro": 0.125,
        "acceptance": {"kept": 3, "candidates": 12, "acceptance_rate": 0.25, "mean_attempts": 2.0,
                       "max_attempts": 4, "classes_hit_max_attempts": {}}}))
    text = open(write_report(str(tmp_path), "tiny")).read()
    assert "[manifest (one row per candidate)](samples/manifest.csv)" in text
    assert "![contact sheet (one row per class)](samples/contact_sheet.png)" in text
    assert "lora/lora.safetensors" not in text and "classifier.safetensors" not in text  # not written
    assert "| this run | 0.5000 | 0.2500 | 0.1250 |" in text
    assert f"| {PAPER['precision_macro']} | {PAPER['recall_macro']} | {PAPER['f1_macro']} |" in text
    assert "3 kept of 12 candidates" in text and "machinery" in text


def test_report_shows_real_beside_synthetic_and_the_evaluations(tmp_path):
    from PIL import Image

    from model.data import load_split
    from model.eval.report import PER_SIDE
    from conftest import ROOT
    real = load_split(f"{ROOT}/examples/pathmnist_subset_28.npz", "test")
    for name in ("adipose", "debris"):
        (tmp_path / "samples" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (200, 40 * i, 90)).save(tmp_path / "samples" / name / f"{name}_{i:04d}.png")
    (tmp_path / "samples" / "fidelity.json").write_text(json.dumps({
        "run": "x", "data": "d", "split": "test",
        "validator penultimate layer": {"overall": {"frechet_distance": 3.0, "floor_frechet_distance": 2.0,
                                                    "ratio_to_floor": 1.5, "n_floor": 4}}}))
    (tmp_path / "memorization").mkdir()
    (tmp_path / "memorization" / "memorization.json").write_text(json.dumps({
        "generated": {"n": 6, "near_copies": 0, "pixel_rms": {"median": 0.09}},
        "real_test": {"n": 100, "near_copies": 0, "pixel_rms": {"median": 0.1}}, "ratio": {"pixel_rms": 0.9}}))
    (tmp_path / "utility").mkdir()
    (tmp_path / "utility" / "utility.json").write_text(json.dumps(
        {arm: {"accuracy": acc} for arm, acc in [("real", 0.7), ("synthetic", 0.5), ("hybrid", 0.75)]}))
    text = open(write_report(str(tmp_path), "mini", real)).read()
    assert text.index("![real (left) and kept synthetic (right) images per class](real_vs_synthetic.png)") \
        < text.index("## 1.")
    with Image.open(tmp_path / "real_vs_synthetic.png") as grid:
        cell = 64
        assert grid.height == len(real.classes) * cell                    # one row per class
        assert grid.width > (2 * PER_SIDE + 1) * cell                      # + the class labels
        row_debris = 2 * cell + cell // 2                                 # debris is class 2
        synth_x = grid.width - PER_SIDE * cell + cell // 2                 # first synthetic cell
        assert grid.getpixel((synth_x, row_debris)) == (200, 0, 90)
        assert grid.getpixel((synth_x, cell + cell // 2)) == (255, 255, 255)  # no background kept
    assert "3; real train vs test floor 2, ratio 1.50" in text
    assert "pixel RMS 0.0900 (real test images: 0.1000, ratio 0.90); near-copies 0 of 6" in text
    assert "real 0.700, synthetic 0.500, hybrid 0.750" in text
