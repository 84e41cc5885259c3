"""The conditional GAN baseline (model/gan, train_gan.py): the two networks, the hinge loss by hand,
the gan.safetensors file, bit-exact resume after a crash and after Ctrl-C, refused reruns, the
script's one-line errors, and D learning to tell the real subset from G's images.

Networks here are tiny (16 px, 8-16 channels) and runs a few dozen steps on the bundled subset."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

import model.gan.train as gan_train
from model.data import PATHMNIST_CLASSES
from model.gan.generator import is_gan_file, load_gan, sample_images, save_gan
from model.gan.nets import Discriminator, Generator, hinge_d_loss, hinge_g_loss, mode_seeking_loss
from model.gan.train import GANRecipe, train
from model.io import UserError, read_safetensors, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
CONFIG = {"num_classes": 9, "z_dim": 16, "embed_dim": 8, "channels": 8, "resolution": 16}
TRAIN_STEP = gan_train._train_step     # the real one, before any test wraps it
TINY = dict(data=NPZ, resolution=16, batch_size=8, z_dim=16, embed_dim=8, g_channels=8, d_channels=8,
            device="cpu")


def tiny_generator(seed=0):
    """A Generator whose BatchNorm statistics are not the initial zeros/ones (a few train-mode
    batches), so a save/load that dropped them would show."""
    torch.manual_seed(seed)
    net = Generator(**CONFIG)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, CONFIG["z_dim"]), torch.randint(0, 9, (8,)))
    return net.eval()


# --------------------------------------------------------------------------- the networks and loss

def test_generator_shape_range_and_class_conditioning():
    g = tiny_generator()
    z = torch.randn(6, CONFIG["z_dim"])
    with torch.no_grad():
        x0, x1 = g(z, torch.zeros(6, dtype=torch.long)), g(z, torch.ones(6, dtype=torch.long))
    assert x0.shape == (6, 3, 16, 16)
    assert x0.min() >= -1 and x0.max() <= 1
    # The same z with another class: every image changes, by more than float noise.
    assert ((x0 - x1).abs().flatten(1).max(dim=1).values > 1e-3).all()


def test_sample_is_a_function_of_class_and_seed():
    gan_images = lambda classes, seeds: sample_images(tiny_generator(), classes, seeds)
    batch = gan_images([0, 4, 4, 8], [11, 11, 12, 11])
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(batch, gan_images([0, 4, 4, 8], [11, 11, 12, 11]))
    # Alone or in another batch, (class 4, seed 12) is the same image (up to a kernel's last bits).
    torch.testing.assert_close(gan_images([4], [12])[0], batch[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(gan_images([7, 4], [3, 12])[1], batch[2], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[1], batch[2], atol=1e-3)          # another seed, another image
    assert gan_images([], []).shape == (0, 3, 16, 16)


def test_discriminator_projection_output_and_spectral_norm():
    torch.manual_seed(0)
    d = Discriminator(9, channels=8, resolution=16)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 8])
    d.eval()
    with torch.no_grad():
        out = d(x, y)
        assert out.shape == (5,)
        # Projection (Miyato & Koyama 2018, eq. 3): changing the class moves the score by exactly
        # (embed(y1) - embed(y2)) . phi(x), the unconditional part psi(phi(x)) cancels.
        phi, e = d.features(x), d.embed.weight
        moved = d(x, torch.full((5,), 4)) - out
        torch.testing.assert_close(moved, ((e[4] - e[y]) * phi).sum(dim=1), rtol=1e-5, atol=1e-5)
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
    assert len(layers) == 1 + 2 * 2 + 2                    # first conv, 2 levels of 2 convs, psi, embed
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    # After enough power iterations (one per train-mode forward), every layer's weight, as the
    # matrix (out, in * k * k), has largest singular value 1.
    d.train()
    with torch.no_grad():
        for _ in range(30):
            d(x, y)
    d.eval()
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 1e-3, (m, sigma)


def test_hinge_losses_equal_hand_computation():
    d_real = torch.tensor([2.0, 0.5, -1.0])
    d_fake = torch.tensor([-2.0, 0.0, 1.5])
    # L_D = mean(max(0, 1 - r)) + mean(max(0, 1 + f)) = (0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3 = 2.
    assert hinge_d_loss(d_real, d_fake).item() == pytest.approx(2.0, abs=1e-6)
    # L_G = -mean(f) = -(-2 + 0 + 1.5) / 3 = 1/6.
    assert hinge_g_loss(d_fake).item() == pytest.approx(1 / 6, abs=1e-6)
    # Beyond the margins nothing is left: real above +1, fake below -1.
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0


def test_mode_seeking_loss_equals_hand_computation():
    # One pair (first half, second half): |x1 - x2| = (0.2, 0.4), mean 0.3; |z1 - z2| = (1, 0, 0.5),
    # mean 0.5; the ratio 0.6, the loss 1 / (0.6 + 1e-5).
    fake = torch.tensor([[0.0, 0.4], [0.2, 0.0]]).view(2, 1, 1, 2)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -0.5]])
    assert mode_seeking_loss(fake, z).item() == pytest.approx(1 / 0.60001, rel=1e-6)


# ------------------------------------------------------------------------------- gan.safetensors

def test_save_load_round_trip_and_is_gan_file(tmp_path):
    net = tiny_generator(seed=3)
    path = str(tmp_path / "gan.safetensors")
    save_gan(path, net, CONFIG, PATHMNIST_CLASSES, {"steps": 7, "data_fingerprint": "abc"})
    assert is_gan_file(path)
    gan = load_gan(path)
    assert gan.classes == list(PATHMNIST_CLASSES) and gan.resolution == 16 and gan.config == CONFIG
    assert gan.meta["steps"] == 7 and gan.meta["data_fingerprint"] == "abc"
    saved, loaded = net.state_dict(), gan.net.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)        # BatchNorm statistics too
    assert not gan.net.training
    assert torch.equal(gan.sample([1, 5], [0, 9]), sample_images(net, [1, 5], [0, 9]))
    with pytest.raises(UserError, match="class index 9"):
        gan.sample([9], [0])
    with pytest.raises(UserError, match="one seed per class"):
        gan.sample([1, 2], [0])

    other = str(tmp_path / "other.safetensors")
    save_safetensors(other, {"w": torch.zeros(2)}, metadata={"format": "pt"})
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    assert not is_gan_file(other)
    assert not is_gan_file(str(tmp_path / "text.safetensors"))
    assert not is_gan_file(str(tmp_path / "absent.safetensors"))
    with pytest.raises(UserError, match="not a medsynth GAN file"):
        load_gan(other)


# ----------------------------------------------------------------------------- training and resume

def read_run(folder):
    """The outputs that must not depend on interruptions: gan.safetensors (tensors and bytes),
    the per-step log and D's scores, every sample grid, state.pt's tensors."""
    tensors, meta = read_safetensors(os.path.join(folder, "gan.safetensors"))
    with open(os.path.join(folder, "gan.safetensors"), "rb") as f:
        raw = f.read()
    with open(os.path.join(folder, "log.json")) as f:
        log = json.load(f)
    grids = {}
    for name in sorted(os.listdir(os.path.join(folder, "samples"))):
        with open(os.path.join(folder, "samples", name), "rb") as f:
            grids[name] = f.read()
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    return tensors, meta, raw, {k: log[k] for k in ("steps", "log", "checks")}, grids, state


def flat_tensors(obj, prefix=""):
    """Every tensor in a nested state (dicts and lists), by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    return {k: v for key, value in items for k, v in flat_tensors(value, f"{prefix}/{key}").items()}


def counting_steps(monkeypatch, crash_at=None, ctrl_c_at=None):
    """Count the (0-based) training steps taken. crash_at: die on entering that step (an
    exception out of the loop, as a second Ctrl-C or a crash: nothing more is saved). ctrl_c_at:
    a real SIGINT to this process during that step (the first Ctrl-C: the loop finishes the step,
    saves its state and stops)."""
    taken = []

    def step(run, s):
        if s == crash_at:
            raise KeyboardInterrupt
        if s == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)
        taken.append(s)
        return TRAIN_STEP(run, s)
    monkeypatch.setattr(gan_train, "_train_step", step)
    return taken


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run, checkpoints at steps 3, 6 and 8."""
    folder = str(tmp_path_factory.mktemp("gan") / "reference")
    train(GANRecipe(**TINY, steps=8, save_every=3), folder)
    return folder


def test_resume_after_crash_is_bit_exact(reference, tmp_path, monkeypatch):
    recipe, folder = GANRecipe(**TINY, steps=8, save_every=3), str(tmp_path / "run")
    counting_steps(monkeypatch, crash_at=4)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, folder)                  # dies in step 5: the last checkpoint is step 3's
    assert read_run(folder)[3]["steps"] == 3
    taken = counting_steps(monkeypatch)
    train(recipe, folder)
    assert taken == [3, 4, 5, 6, 7]             # it resumed rather than started over
    assert_same_run(folder, reference)


def test_resume_after_ctrl_c_is_bit_exact(reference, tmp_path, monkeypatch):
    recipe, folder = GANRecipe(**TINY, steps=8, save_every=3), str(tmp_path / "run")
    counting_steps(monkeypatch, ctrl_c_at=4)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, folder)                  # state.pt after step 5, between two checkpoints
    assert torch.load(os.path.join(folder, "state.pt"), weights_only=True)["step"] == 5
    assert read_run(folder)[3]["steps"] == 3   # log.json and gan.safetensors are step 3's
    taken = counting_steps(monkeypatch)
    train(recipe, folder)
    assert taken == [5, 6, 7]
    assert_same_run(folder, reference)


def assert_same_run(folder, reference):
    tensors, meta, raw, log, grids, state = read_run(folder)
    ref_tensors, ref_meta, ref_raw, ref_log, ref_grids, ref_state = read_run(reference)
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    assert meta == ref_meta and raw == ref_raw
    assert log == ref_log and log["steps"] == 8 and len(log["log"]) == 8
    assert grids == ref_grids and list(grids) == ["step-000003.png", "step-000006.png", "step-000008.png"]
    flat, ref_flat = flat_tensors(state), flat_tensors(ref_state)
    assert flat.keys() == ref_flat.keys()
    assert all(torch.equal(flat[k], ref_flat[k]) for k in flat)


def test_finished_run_is_left_alone_and_other_settings_are_refused(reference, tmp_path, monkeypatch):
    before = {n: os.stat(os.path.join(reference, n)).st_mtime_ns for n in ("gan.safetensors", "state.pt")}
    taken = counting_steps(monkeypatch)
    train(GANRecipe(**TINY, steps=8, save_every=3), reference)
    assert taken == []
    assert before == {n: os.stat(os.path.join(reference, n)).st_mtime_ns for n in before}

    with pytest.raises(UserError, match=r"other settings \(d_lr=0.0002\)"):
        train(GANRecipe(**TINY, steps=8, save_every=3, d_lr=1e-3), reference)
    with pytest.raises(UserError, match=r"other settings \(steps=8\)"):
        train(GANRecipe(**TINY, steps=9, save_every=3), reference)
    # The same file name with other images in it: refused by the data's fingerprint.
    other = str(tmp_path / "other.npz")
    with np.load(NPZ) as data:
        arrays = dict(data)
    arrays["train_images"] = arrays["train_images"][::-1].copy()
    np.savez(other, **arrays)
    with pytest.raises(UserError, match="other training data"):
        train(GANRecipe(**{**TINY, "data": other}, steps=8, save_every=3), reference)
    assert before == {n: os.stat(os.path.join(reference, n)).st_mtime_ns for n in before}


def test_overwrite_starts_over(tmp_path):
    folder = str(tmp_path / "run")
    train(GANRecipe(**TINY, steps=2, save_every=1), folder)
    train(GANRecipe(**TINY, steps=1, save_every=1, seed=1), folder, overwrite=True)
    assert sorted(os.listdir(os.path.join(folder, "samples"))) == ["step-000001.png"]
    assert load_gan(os.path.join(folder, "gan.safetensors")).meta["recipe"]["seed"] == 1


def test_discriminator_learns_real_from_fake(tmp_path):
    """A short run on the real subset: D's hinge loss starts near the 2 of a D that cannot tell
    real from fake (scores near 0) and averages well below it; at the checkpoints D scores real
    images, training and unseen validation ones alike, above G's; nothing is NaN."""
    folder = str(tmp_path / "run")
    recipe = GANRecipe(**{**TINY, "g_channels": 16, "d_channels": 16, "batch_size": 16}, steps=60, save_every=30)
    train(recipe, folder)
    with open(os.path.join(folder, "log.json")) as f:
        log = json.load(f)
    d_loss, g_loss = np.array([row[1] for row in log["log"]]), np.array([row[2] for row in log["log"]])
    assert np.isfinite(d_loss).all() and np.isfinite(g_loss).all()
    assert d_loss[:3].mean() > 1.7
    assert d_loss.mean() < d_loss[:3].mean() - 0.3
    for check in log["checks"]:
        assert all(np.isfinite(check[k]) for k in ("d_train", "d_val", "d_fake"))
        assert check["d_train"] > check["d_fake"] + 0.3 and check["d_val"] > check["d_fake"] + 0.3


# ------------------------------------------------------------------------------------- the script

def script(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_gan.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--resolution", "30"], r"--resolution 30: must be 4 times a power of 2"),
    (["--data", "{tmp}/missing.npz"], r"--data \S*missing\.npz: not a file or folder"),
])
def test_script_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = script(*[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "run").exists()


def test_script_help():
    out = script("--help")
    assert out.returncode == 0
    assert "--g-channels" in out.stdout and "--overwrite" in out.stdout and "--seed" in out.stdout
