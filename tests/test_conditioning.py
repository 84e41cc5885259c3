"""The diffusion classifier (model/eval/conditioning.py, `evaluate.py conditioning`, and its log
during LoRA training): a UNet planted to know the class scores 1, one that ignores the prompt
scores the tie class's share; the command resumes, refuses other settings and is independent of
the batch size; during training it writes its log and leaves the training's RNG alone."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
import train_lora
from _helpers_pipeline import EXAMPLE_NPZ, make_lora, make_sd
from model.eval import conditioning as C
from model.io import cli
from model.lora import train as lora_train
from model.lora.files import load_lora
from model.sd.ddim import DDIMScheduler

N_CLASSES, PER_CLASS, SHAPE = 3, 4, (4, 2, 2)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ------------------------------------------------------------------ toy UNets, written by hand

class PlantedUNet(nn.Module):
    """Knows the classes: reads the class c of its prompt from a one-hot embedding, assumes the
    clean latent is class c's constant latent, and returns the target that makes exactly:
    from x_t = sqrt(a) z0 + sqrt(1 - a) eps, eps = (x_t - sqrt(a) z0) / sqrt(1 - a), and for
    v-prediction v = sqrt(a) eps - sqrt(1 - a) z0. Right for its class, far off for the others."""

    def __init__(self, class_latents, alphas_cumprod, v_prediction=False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))   # gives the module a device
        self.latents, self.a, self.v = class_latents.double(), alphas_cumprod.double(), v_prediction

    def forward(self, x, t, cond):
        z0 = self.latents[cond[:, 0, :N_CLASSES].argmax(dim=1)]                  # (b, 4, h, w)
        a = self.a[t].view(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * z0) / (1 - a).sqrt()
        out = a.sqrt() * eps - (1 - a).sqrt() * z0 if self.v else eps
        return out.float()


class DeafUNet(nn.Module):
    """Ignores the prompt: its output depends on x_t and t only."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        return 0.3 * x + (t.float() / 1000).view(-1, 1, 1, 1)


def toy_set(seed=0, jitter=0.05):
    """A balanced set: class c's images are its constant latent (c - 1) * 0.8 plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    class_latents = torch.stack([torch.full(SHAPE, (c - 1) * 0.8) for c in range(N_CLASSES)])
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    z0 = class_latents[labels] + jitter * torch.randn(len(labels), *SHAPE, generator=g)
    cond = torch.zeros(N_CLASSES, 77, 8)
    cond[torch.arange(N_CLASSES), 0, torch.arange(N_CLASSES)] = 1.0              # one-hot in token 0
    return class_latents, z0, labels, cond


def classify(unet, scheduler, z0, labels, cond, **settings):
    s = C.ConditioningSettings(**{"draws": 6, "batch_size": 7, **settings})
    errors = C.prompt_errors(unet, scheduler, z0, torch.arange(len(z0)), cond, s)
    return errors, C.summarise(errors, labels.numpy(), [f"c{i}" for i in range(N_CLASSES)])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_a_unet_planted_with_the_class_scores_one(kind):
    class_latents, z0, labels, cond = toy_set()
    scheduler = DDIMScheduler(**SD_BETAS, prediction_type=kind)
    unet = PlantedUNet(class_latents, scheduler.alphas_cumprod, kind == "v_prediction")
    errors, r = classify(unet, scheduler, z0, labels, cond)
    assert errors.shape == (len(z0), 6, N_CLASSES)
    assert r["accuracy"] == 1.0 and r["confusion"] == np.diag([PER_CLASS] * N_CLASSES).tolist()
    assert r["per_class_accuracy"] == {"c0": 1.0, "c1": 1.0, "c2": 1.0} and r["relative_spread"] > 0.5
    # with the images exactly their class latent, the true class's error is 0: the target is the
    # model's own (eps, or v for v-prediction), and the (t, eps) pairs are the ones x_t was made of
    _, exact, _, _ = toy_set(jitter=0.0)
    errors, _ = classify(unet, scheduler, exact, labels, cond)
    true = errors[np.arange(len(labels)), :, labels.numpy()]                      # (N, K)
    assert true.max() < 1e-8 and errors.mean(axis=1).min(axis=1).max() < 1e-8


def test_a_unet_that_ignores_the_prompt_scores_the_tie_class_share():
    """Equal errors for every prompt (the draws are shared by the classes): argmin takes the
    first class, so the accuracy is that class's share of a balanced set, 1 / n_classes."""
    _, z0, labels, cond = toy_set()
    errors, r = classify(DeafUNet(), DDIMScheduler(**SD_BETAS), z0, labels, cond)
    assert (errors == errors[:, :, :1]).all()
    assert r["accuracy"] == pytest.approx(1 / N_CLASSES) and r["chance"] == pytest.approx(1 / N_CLASSES)
    assert r["relative_spread"] == 0.0
    assert r["predicted_counts"] == {"c0": len(labels), "c1": 0, "c2": 0}


def test_scores_by_hand():
    errors = np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0], [1.0, 5.0]])[:, None, :].repeat(2, axis=1)  # (4, K=2, 2)
    r = C.summarise(errors, [0, 0, 1, 1], ["a", "b"])
    # predictions 0, 1, 0 (a tie: the first class), 0
    assert r["confusion"] == [[1, 1], [2, 0]] and r["accuracy"] == 0.25 and r["n_images"] == 4
    assert r["per_class_accuracy"] == {"a": 0.5, "b": 0.0} and r["predicted_counts"] == {"a": 3, "b": 1}
    assert r["relative_spread"] == pytest.approx(np.mean([1 / 1.5, 2 / 2, 0, 4 / 3]))
    assert r["accuracy_se"] == pytest.approx((0.25 * 0.75 / 4) ** 0.5)
    lo, hi = r["accuracy_interval_95"]
    assert 0 < lo < 0.25 < hi < 1


def test_draws_are_stratified_and_seeded_by_seed_and_image():
    noise, t = C.draws(0, 5, 8, SHAPE, 1000)
    assert noise.shape == (8, *SHAPE) and all(k * 125 <= int(v) < (k + 1) * 125 for k, v in enumerate(t))
    again, t2 = C.draws(0, 5, 8, SHAPE, 1000)
    assert torch.equal(noise, again) and torch.equal(t, t2)
    assert not torch.equal(noise, C.draws(0, 6, 8, SHAPE, 1000)[0])
    assert not torch.equal(noise, C.draws(1, 5, 8, SHAPE, 1000)[0])


# ------------------------------------------------------------------ the command, on the tiny SD

@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond")
    make_sd(str(folder / "sd"))
    make_lora(str(folder / "sd"), str(folder / "lora.safetensors"))   # records resolution 64: 8x8 latents
    return folder


def command(fx, out, *extra):
    return ["conditioning", "--lora", fx / "lora.safetensors", "--data", EXAMPLE_NPZ, "--images-per-class", 1,
            "--draws", 2, "--out", out, *extra]


def run_evaluate(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    cli(evaluate.main)


def test_command_writes_resumes_refuses_and_overwrites(fx, tmp_path, monkeypatch, capsys):
    calls, real = [], C.prompt_errors
    monkeypatch.setattr(C, "prompt_errors", lambda *a: calls.append(1) or real(*a))
    out = tmp_path / "out"
    run_evaluate(monkeypatch, command(fx, out))
    r = json.loads((out / "conditioning.json").read_text())
    for key in ("accuracy", "chance", "per_class_accuracy", "predicted_counts", "relative_spread", "confusion",
                "n_images", "draws", "split", "model", "lora", "seed", "settings", "accuracy_interval_95"):
        assert key in r, key
    assert r["n_images"] == 9 and r["draws"] == 2 and r["split"] == "val" and r["chance"] == pytest.approx(1 / 9)
    assert r["resolution"] == 64 and r["model"] == str(fx / "sd") and sum(r["predicted_counts"].values()) == 9
    assert os.path.getsize(out / "confusion.png") > 0
    assert np.load(out / "errors.npz")["errors"].shape == (9, 2, 9)
    assert "accuracy" in capsys.readouterr().out and calls == [1]

    stamp = os.stat(out / "conditioning.json").st_mtime_ns
    run_evaluate(monkeypatch, command(fx, out))          # the same settings: nothing to do
    assert "nothing to do" in capsys.readouterr().out and calls == [1]
    assert os.stat(out / "conditioning.json").st_mtime_ns == stamp

    with pytest.raises(SystemExit) as e:                 # other settings: one line, exit 2
        run_evaluate(monkeypatch, command(fx, out, "--seed", 3))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "seed: 0 there, 3 now" in err[0] and "--overwrite" in err[0] and calls == [1]

    run_evaluate(monkeypatch, command(fx, out, "--seed", 3, "--overwrite"))
    assert calls == [1, 1] and json.loads((out / "conditioning.json").read_text())["seed"] == 3


def test_batch_size_and_image_subset_change_no_draw(fx, tmp_path, monkeypatch):
    for name, extra in (("a", ["--batch-size", 5]), ("b", ["--batch-size", 64]),
                        ("c", ["--batch-size", 64, "--images-per-class", 2])):
        run_evaluate(monkeypatch, command(fx, tmp_path / name, *extra))
    a, b, c = (np.load(tmp_path / name / "errors.npz") for name in "abc")
    assert np.array_equal(a["index"], b["index"])
    np.testing.assert_allclose(a["errors"], b["errors"], rtol=1e-5)   # float rounding of other batch sizes only
    shared = np.isin(c["index"], a["index"])                           # 2 per class holds the 1 per class
    np.testing.assert_allclose(c["errors"][shared], a["errors"], rtol=1e-5)
    assert json.loads((tmp_path / "a" / "conditioning.json").read_text())["settings"] == \
        json.loads((tmp_path / "b" / "conditioning.json").read_text())["settings"]


# ------------------------------------------------------------------------- during LoRA training

def lora_args(fx, out, *extra):
    return ["--preset", "tiny", "--model", str(fx / "sd"), "--data", EXAMPLE_NPZ, "--out", str(out),
            "--resolution", "64", "--sample-every", "0", "--few-shot", "2", "--batch-size", "2",
            "--save-every", "2", *map(str, extra)]


def test_training_logs_the_check_and_resumes_it_exactly(fx, tmp_path, monkeypatch):
    extra = ["--max-steps", 4, "--conditioning-images", 1, "--conditioning-draws", 2]
    train_lora.main(lora_args(fx, tmp_path / "a", *extra))
    rows = (tmp_path / "a" / "conditioning.csv").read_text().splitlines()
    assert rows[0] == "step,accuracy,chance,relative_spread,images,draws"
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "2", "4"] and all(r.endswith(",9,2") for r in rows[1:])
    assert os.path.getsize(tmp_path / "a" / "conditioning.png") > 0

    real_save = lora_train.save_torch

    def crash_before_checkpoint_4(path, obj):   # step 4's row is written, its checkpoint is not
        if obj["step"] == 4:
            raise KeyboardInterrupt
        real_save(path, obj)
    monkeypatch.setattr(lora_train, "save_torch", crash_before_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        train_lora.main(lora_args(fx, tmp_path / "b", *extra))
    monkeypatch.setattr(lora_train, "save_torch", real_save)
    train_lora.main(lora_args(fx, tmp_path / "b", *extra))   # resumes from step 2
    for name in ("conditioning.csv", "conditioning.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_check_leaves_the_training_rng_alone(fx, tmp_path):
    """With LoRA dropout (which draws from the global RNG) in the UNet and the text encoder, a
    run with the check gives the very LoRA of a run without it."""
    extra = ["--max-steps", 2, "--lora-dropout", 0.2, "--targets", "unet_attn,text_attn"]
    train_lora.main(lora_args(fx, tmp_path / "off", *extra, "--conditioning-images", 0))
    train_lora.main(lora_args(fx, tmp_path / "on", *extra, "--conditioning-images", 1))
    assert not (tmp_path / "off" / "conditioning.csv").exists() and (tmp_path / "on" / "conditioning.csv").exists()
    off, on = (load_lora(tmp_path / name / "lora.safetensors")[0] for name in ("off", "on"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


def test_report_shows_accuracy_against_chance_and_per_class(tmp_path):
    from model.eval.report import build_report
    from model.io import write_json
    errors = np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0], [1.0, 5.0]])[:, None, :]   # predictions 0, 1, 0, 0
    write_json(tmp_path / "conditioning" / "conditioning.json",
               {**C.summarise(errors, [0, 0, 1, 1], ["a", "b"]), "split": "val"})
    md = build_report(str(tmp_path), "mini")
    assert "accuracy 0.250" in md and "against chance 0.500" in md
    assert "| a | 0.50 | 3 |" in md and "| b | 0.00 | 1 |" in md
    assert "(conditioning/conditioning.json)" in md and "lora/conditioning.png" not in md
