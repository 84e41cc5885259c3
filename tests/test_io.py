"""Shared plumbing: atomic writes, one-line user errors, safe loading, LR schedule, PNG figures."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.io import UserError, atomic_write, load_torch, read_safetensors, save_safetensors, write_json
from model.plots import confusion_png, image_grid, line_plot
from model.training import lr_at


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"v": 1})

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_text().strip().startswith("{") and '"v": 1' in path.read_text()
    assert os.listdir(tmp_path) == ["out.json"]  # the temp file was cleaned up


def test_cli_turns_user_error_into_one_line_and_exit_2(tmp_path):
    code = "from model.io import cli, UserError\ndef main():\n    raise UserError('bad thing: x.npz')\ncli(main)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: bad thing: x.npz"


def test_load_torch_refuses_pickled_objects_and_reads_tensors(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="weights_only"):
        load_torch(bad)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(load_torch(good)["w"], torch.arange(3.0))


def test_safetensors_roundtrip_and_corrupt_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"a": torch.randn(2, 3)}, {"rank": 4, "name": "x"})
    tensors, meta = read_safetensors(path)
    assert tensors["a"].shape == (2, 3) and meta == {"rank": "4", "name": "x"}
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match="t.safetensors"):
        read_safetensors(path)


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 10, 1e-4, 1e-6) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-6)


def test_figures_are_valid_pngs(tmp_path):
    line_plot(tmp_path / "loss.png", {"loss": ([0, 1, 2], [1.0, 0.5, 0.25])}, title="loss")
    confusion_png(tmp_path / "cm.png", np.array([[3, 1], [0, 4]]), ["a", "b"])
    grid = image_grid([Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")], 2, ["r0", "r1"], cell=16)
    assert Image.open(tmp_path / "loss.png").size == (720, 440)
    assert Image.open(tmp_path / "cm.png").format == "PNG"
    assert grid.getpixel((grid.width - 8, 8)) == (0, 128, 0) and grid.getpixel((grid.width - 8, 24)) == (255, 255, 255)
