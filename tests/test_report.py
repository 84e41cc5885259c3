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
