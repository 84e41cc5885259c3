"""The reject loop's other generators (model/reject/generators.py): image-to-image from real images
(SDEdit), classifier guidance, and a GAN checkpoint, on a tiny random SD / GAN with validators whose
verdicts the test controls (tests/_helpers_reject.py).

- img2img at strength 1 is text-to-image from the same seed; at strength 0 it is the init image
  encoded and decoded; in between it starts from the init image noised to the step's timestep.
- The classifier-guidance gradient matches central finite differences, and the guided DDIM output
  is ADM eq. 14 computed by hand.
- sample_validated.py gives the same folder for every generator kind in one process, in two under
  torchrun, and killed (SIGKILL mid-manifest) and rerun.
"""
import os
import subprocess
import sys

import pytest
import torch

from _helpers_pipeline import kill_at_script, script_env
from _helpers_reject import coin_from_images, new_classifier, save
from model.data import PATHMNIST_CLASSES, load_split
from model.gan.generator import load_gan, save_gan
from model.gan.nets import Generator
from model.reject.guidance import ClassifierGradient, log_prob
from model.reject.init_images import InitImages
from model.reject.run_folder import read_manifest
from model.sd.ddim import DDIMScheduler
from model.sd.loader import load_pipeline
from model.sd.sampling import _guided, decode_latents, decode_latents_differentiable, encode_images, generate
from model.sd.tiny import make_tiny_sd
from test_reject import ROOT, cli, files_of

NPZ = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
GEN = dict(steps=4, guidance=3.0, eta=0.0, height=32, width=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))
    return folder, load_pipeline(folder)


def init_latents(pipe, n, size=32):
    """n real training images of the bundled subset as scaled latents (n, 4, size/f, size/f)."""
    images = InitImages(NPZ, PATHMNIST_CLASSES, [0]).by_class[0][:n]
    x = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear")
    return encode_images(pipe, x), x


# ------------------------------------------------------------------------------ image-to-image

def test_img2img_strength_one_is_text_to_image_and_zero_the_round_trip(tiny):
    _, pipe = tiny
    init, x = init_latents(pipe, 2)
    seeds = [3, 4]
    t2i, _ = generate(pipe, ["a", "b"], seeds, **GEN)
    full, _ = generate(pipe, ["a", "b"], seeds, **GEN, init_latents=init, strength=1.0)
    assert torch.equal(full, t2i)
    none, _ = generate(pipe, ["a", "b"], seeds, **GEN, init_latents=init, strength=0.0)
    assert torch.equal(none, decode_latents(pipe, init))
    # and the round trip is really the VAE's, not the input passed through
    assert not torch.equal(none, x) and none.shape == x.shape


def test_img2img_starts_from_the_noised_init_and_runs_the_last_steps(tiny):
    _, pipe = tiny
    init, _ = init_latents(pipe, 2)
    seen = []
    generate(pipe, ["a", "b"], [3, 4], **GEN, init_latents=init, strength=0.5,
             on_ddim_step=lambda i, t, x0: seen.append((i, int(t))))
    pipe.scheduler.set_timesteps(GEN["steps"])
    timesteps = pipe.scheduler.timesteps.tolist()
    assert seen == [(i, timesteps[i]) for i in (2, 3)]   # int(4 * 0.5) = 2 steps: the last two
    # the first step's input is q(x_t | x_0) at timesteps[2]: sqrt(a) x0 + sqrt(1 - a) eps (DDPM eq. 4)
    inputs = []
    unet_forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: (inputs.append(x.clone()), unet_forward(x, t, **kw))[1]
    try:
        generate(pipe, ["a", "b"], [3, 4], **{**GEN, "guidance": 1.0}, init_latents=init, strength=0.5)
    finally:
        pipe.unet.forward = unet_forward
    a = float(pipe.scheduler.alphas_cumprod[timesteps[2]])
    eps = torch.cat([torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    torch.testing.assert_close(inputs[0], a ** 0.5 * init + (1 - a) ** 0.5 * eps, rtol=1e-5, atol=1e-6)


def test_init_images_are_chosen_by_seed_from_the_train_split():
    init = InitImages(NPZ, PATHMNIST_CLASSES, [0, 3])
    train = load_split(NPZ, "train")
    for c, seed in [(0, 0), (0, 7), (3, 12345)]:
        image, name = init.pick(c, seed)
        row = int(name.split(":")[1])
        assert name.startswith("train:") and int(train.labels[row]) == c
        assert torch.equal(image, train.images[row])
        assert init.pick(c, seed)[1] == name and init.pick(c, seed + len(init.by_class[c]))[1] == name


# -------------------------------------------------------------------------- classifier guidance

def test_guidance_gradient_matches_finite_differences(tiny):
    """<d log p / d x0, v> against (f(x0 + h v) - f(x0 - h v)) / 2h, in float64 end to end, for a
    validator with test-time averaging: DDIM step i differentiates its view i mod 8."""
    _, pipe = tiny
    pipe.vae.double()
    try:
        clf = new_classifier(1).double()
        clf.tta = True
        classes = torch.tensor([2, 5, 7])
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
        grad = ClassifierGradient(pipe, clf, classes)
        kept = torch.tensor([0, 2])                      # the alive candidates: classes 2 and 7
        grads = [grad(x0[kept], kept) for step in range(2)]
        assert grad.calls == 4 and grad.steps == 2 and all(d.shape == (2, 4, 4, 4) for d in grads)
        assert not torch.allclose(grads[0], grads[1])    # two orientations, two gradients

        def f(x, view):
            with torch.no_grad():
                return log_prob(clf, decode_latents_differentiable(pipe, x), classes[kept], view=view)

        h = 1e-7  # small: fewer ReLU kinks inside [x - h v, x + h v]; float64 keeps the round-off at ~1e-9
        for step, d in enumerate(grads):
            for _ in range(2):
                v = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
                fd = (f(x0[kept] + h * v, step) - f(x0[kept] - h * v, step)) / (2 * h)   # (2,): per candidate
                torch.testing.assert_close((d * v).flatten(1).sum(1), fd, rtol=1e-4, atol=1e-7)
    finally:
        pipe.vae.float()


def test_log_prob_of_one_view_and_of_all_is_the_validators_own():
    clf = new_classifier(2)
    clf.tta = True
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 4, 8])
    with torch.no_grad():
        view = lambda k, flip: clf(torch.rot90(x.flip(-1) if flip else x, k, dims=(2, 3))).softmax(-1)
        all8 = torch.stack([view(k, flip) for flip in (False, True) for k in range(4)]).mean(0)
        torch.testing.assert_close(log_prob(clf, x, classes), all8[[0, 1, 2], classes].log())
        torch.testing.assert_close(log_prob(clf, x, classes), clf.predict_proba(x)[[0, 1, 2], classes].log())
        torch.testing.assert_close(log_prob(clf, x, classes, view=5), view(1, True)[[0, 1, 2], classes].log())
        torch.testing.assert_close(log_prob(clf, x, classes, view=13), view(1, True)[[0, 1, 2], classes].log())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_ddim_output_is_adm_eq_14(prediction_type):
    """With a constant gradient g: eps_hat = eps - w sqrt(1 - a_t) g / sqrt(a_t) (the gradient is
    taken at the x0 estimate, d x0 / d x_t = 1 / sqrt(a_t)), returned as the scheduler's own kind of
    network output, all by hand."""
    s = DDIMScheduler(prediction_type=prediction_type)
    s.set_timesteps(4)
    t = int(s.timesteps[1])
    a = float(s.alphas_cumprod[t])
    g = torch.Generator().manual_seed(1)
    x, out, const = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    if prediction_type == "epsilon":
        eps = out
    else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022), x = sqrt(a) x0 + sqrt(1 - a) eps
        eps = a ** 0.5 * out + (1 - a) ** 0.5 * x
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    seen = []

    def grad(x0_estimate, kept):
        seen.append((x0_estimate, kept))
        return const

    guided = _guided(s, out, x, t, torch.tensor([0, 1]), grad, 2.5)
    torch.testing.assert_close(seen[0][0], x0, rtol=1e-5, atol=1e-5)
    eps_hat = eps - 2.5 * (1 - a) ** 0.5 * const / a ** 0.5
    x0_hat = (x - (1 - a) ** 0.5 * eps_hat) / a ** 0.5
    want = eps_hat if prediction_type == "epsilon" else a ** 0.5 * eps_hat - (1 - a) ** 0.5 * x0_hat
    torch.testing.assert_close(guided, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- the loop, every generator kind

@pytest.fixture(scope="module")
def kinds(tiny, tmp_path_factory):
    """{kind: the sample_validated.py argv without --out}: a GAN checkpoint; SD image-to-image with
    classifier guidance. Each with a coin-flip validator calibrated on its own images."""
    folder, pipe = tiny
    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    net = Generator(len(PATHMNIST_CLASSES), z_dim=8, embed_dim=8, channels=8, resolution=16).eval()
    config = {"num_classes": 9, "z_dim": 8, "embed_dim": 8, "channels": 8, "resolution": 16}
    gan_path = str(root / "gan.safetensors")
    save_gan(gan_path, net, config, PATHMNIST_CLASSES, {"steps": 0})
    gan_images = load_gan(gan_path).sample([2] * 24, [10**6 + i for i in range(24)])
    init, _ = init_latents(pipe, 24)
    sd_images, _ = generate(pipe, ["c"] * 24, [10**6 + i for i in range(24)], **GEN, init_latents=init, strength=0.75)
    common = ["--classes", "debris", "5", "--per-class", "3", "--max-attempts", "3", "--batch-size", "2",
              "--device", "cpu"]
    return {
        "gan": ["--generator", gan_path, "--classifier", save(coin_from_images(gan_images, 2, 5), str(root / "g.st")),
                *common],
        "img2img+guidance": ["--model", folder, "--classifier",
                             save(coin_from_images(sd_images, 2, 5), str(root / "s.st")), "--steps", "4",
                             "--guidance", "3", "--resolution", "32", "--init-images", NPZ, "--strength", "0.75",
                             "--classifier-guidance", "2", *common],
    }


def manifest_bytes(folder):
    with open(os.path.join(folder, "manifest.csv"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("kind", ["gan", "img2img+guidance"])
def test_same_folder_in_one_process_two_under_torchrun_and_killed_and_rerun(kinds, kind, tmp_path):
    args = kinds[kind]
    one, two, killed = (str(tmp_path / n) for n in ("one", "two", "killed"))
    r = cli(args + ["--out", one], str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = read_manifest(one)
    assert {row["accepted"] for row in rows} == {0, 1}        # the validator both accepts and rejects
    if kind == "img2img+guidance":
        assert all(row["init_image"].startswith("train:") for row in rows)
    r = cli(args + ["--out", two], str(tmp_path), torchrun=True)
    assert r.returncode == 0, r.stderr
    assert files_of(two) == files_of(one) and manifest_bytes(two) == manifest_bytes(one)

    # SIGKILL halfway through the second manifest write, then the same command again
    wrapper = kill_at_script(str(tmp_path / "kill_at.py"))
    env = script_env(KILL_SCRIPT=os.path.join(ROOT, "sample_validated.py"), KILL_POINT="write:manifest.csv:2")
    dead = subprocess.run([sys.executable, wrapper, *args, "--out", killed], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True)
    assert dead.returncode == -9, dead.stderr
    r = cli(args + ["--out", killed], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert files_of(killed) == files_of(one) and manifest_bytes(killed) == manifest_bytes(one)
