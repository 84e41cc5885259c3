"""train_lora.py --prior-preservation (DreamBooth, Ruiz et al. 2023) on the tiny random SD: the loss
is L_inst + lambda L_prior by hand, the prior images are made once (resumable, redone for other
settings), the identifier prompts go into the LoRA file and into sampling, a resumed run and a
torchrun run equal one uninterrupted process, and bad flags are one line with exit 2."""
import glob
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sample_validated
import train_lora
from model.data import PATHMNIST_CLASSES, class_prompts, read_image
from model.io import UserError, load_torch
from model.lora import prior as prior_mod, train as lora_train
from model.lora.files import load_lora
from model.lora.latent_cache import open_cache
from model.lora.prior import CHUNK, IDENTIFIERS, identifier_prompts
from model.sd.ddim import DDIMScheduler
from model.sd.loader import load_pipeline
from model.sd.tiny import make_tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")
PER_CLASS = 2  # 18 prior images: one full chunk of CHUNK = 16 and one of 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "sd"))


def args(tiny, out, *extra, prior=True):
    return ["--preset", "tiny", "--model", tiny, "--data", NPZ, "--out", str(out), "--resolution", "64",
            "--sample-every", "0", "--few-shot", "2", "--max-steps", "2", "--batch-size", "2",
            *(["--prior-preservation", "--prior-images", str(PER_CLASS)] if prior else []), *map(str, extra)]


def prior_dirs(out):
    return sorted(glob.glob(os.path.join(out, "prior-*")))


def pngs(folder):
    """The prior images in class order, image order: the order of the cache's latents."""
    found = sorted(glob.glob(os.path.join(folder, "images", "*", "*.png")))
    return sorted(found, key=lambda p: PATHMNIST_CLASSES.index(os.path.basename(os.path.dirname(p))))


def counting_generate(monkeypatch):
    calls, real = [], prior_mod.generate

    def spy(pipe, prompts, **kw):
        calls.append(len(prompts))
        return real(pipe, prompts, **kw)
    monkeypatch.setattr(prior_mod, "generate", spy)
    return calls


def test_loss_is_instance_plus_weighted_prior_by_hand():
    """A UNet with a fixed output F: each half's loss is mean |F - eps|^2 over its own samples, with
    eps the noise plus the offset, and the total is L_inst + lambda L_prior; the UNet gets x_t of
    the right latents (instance first, then prior) and each half its own prompt's text states."""
    g = torch.Generator().manual_seed(0)
    b, n_classes, weight, offset_scale = 3, 2, 0.7, 0.1
    out = torch.randn(2 * b, 4, 2, 2, generator=g)
    seen = {}

    def unet(x_t, t, cond):
        seen.update(x_t=x_t, t=t, cond=cond)
        return out
    latents, prior_latents = np.random.RandomState(1).randn(2, 5, 4, 2, 2).astype(np.float32)
    states = torch.randn(2 * n_classes + 1, 77, 8, generator=g)  # 2 instance prompts, "", 2 prior prompts
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    run = SimpleNamespace(
        device=torch.device("cpu"), precision="no", latents=latents, labels=np.array([0, 1, 1, 0, 1]),
        prior_latents=prior_latents, prior_labels=np.array([1, 0, 0, 1, 1]), prompts=["i0", "i1"],
        train_text=False, frozen_states=states, ids=None, pipe=SimpleNamespace(unet=unet, scheduler=scheduler),
        recipe=SimpleNamespace(noise_offset=offset_scale, snr_gamma=0.0, prior_loss_weight=weight))
    idx, prior_idx = np.array([4, 0, 2]), np.array([1, 3, 3])
    noise, prior_noise = torch.randn(2, b, 4, 2, 2, generator=g)
    offset, prior_offset = torch.randn(2, b, 4, generator=g)
    t, prior_t = torch.tensor([10, 500, 999]), torch.tensor([0, 250, 750])
    dropped = torch.tensor([False, True, False])
    got = lora_train._micro_batch_loss(run, idx, dropped, noise, t, offset, (prior_idx, prior_noise, prior_t, prior_offset))

    def mse(pred, eps):  # by hand, in float64
        return ((pred.double() - eps.double()) ** 2).mean().item()
    eps, prior_eps = noise + offset_scale * offset[..., None, None], prior_noise + offset_scale * prior_offset[..., None, None]
    inst, prior = mse(out[:b], eps), mse(out[b:], prior_eps)
    assert got.tolist() == pytest.approx([inst + weight * prior, inst, prior], rel=1e-6)
    a = scheduler.alphas_cumprod[torch.cat([t, prior_t])].double().view(-1, 1, 1, 1)
    x0 = torch.from_numpy(np.concatenate([latents[idx], prior_latents[prior_idx]])).double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.cat([eps, prior_eps]).double()
    torch.testing.assert_close(seen["x_t"].double(), x_t, rtol=0, atol=1e-5)
    assert seen["t"].tolist() == t.tolist() + prior_t.tolist()
    # rows: class prompt of labels [1, 0, 1] with the second dropped to "" (row 2); prior: 3 + [0, 1, 1]
    assert torch.equal(seen["cond"], states[[1, 2, 1, 3, 4, 4]])


def test_identifier_prompts_are_distinct_and_differ_from_the_plain_prompt_by_the_identifier():
    instance, prior = identifier_prompts(PATHMNIST_CLASSES)
    assert prior == class_prompts(PATHMNIST_CLASSES)
    assert len(set(instance)) == 9 and len(set(IDENTIFIERS)) == len(IDENTIFIERS)
    assert instance[0] == "an H&E stained histopathology image of colorectal sks adipose tissue"
    for ident, inst, plain in zip(IDENTIFIERS, instance, prior):
        assert inst.split().count(ident) == 1 and inst.replace(f" {ident} ", " ", 1) == plain
    assert identifier_prompts(["a", "b"], "{name} cells")[0] == ["sks a cells", "wwx b cells"]
    assert identifier_prompts(["a", "b"], "tissue")[0] == ["tissue sks", "tissue wwx"]
    with pytest.raises(UserError, match="at most 16 classes"):
        identifier_prompts([f"c{i}" for i in range(17)])


def test_prior_set_is_made_once_resumes_and_is_redone_for_other_settings(tiny, tmp_path, monkeypatch):
    calls = counting_generate(monkeypatch)
    real_save, saved = prior_mod.save_png, []

    def crash_in_second_chunk(path, image):
        if len(saved) == CHUNK + 1:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(path, image)
    monkeypatch.setattr(prior_mod, "save_png", crash_in_second_chunk)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_lora.main(args(tiny, out))
    monkeypatch.setattr(prior_mod, "save_png", real_save)
    (folder,) = prior_dirs(out)
    assert len(pngs(folder)) == CHUNK + 1 and calls == [CHUNK, 2]
    train_lora.main(args(tiny, out))                # resumes: only the unfinished chunk again
    assert calls == [CHUNK, 2, 2] and len(pngs(folder)) == 9 * PER_CLASS

    # an uninterrupted build elsewhere makes the same files, and the latents are the PNGs' encodings
    train_lora.main(args(tiny, tmp_path / "ref"))
    (ref,) = prior_dirs(tmp_path / "ref")
    assert os.path.basename(ref) == os.path.basename(folder)
    assert [open(p, "rb").read() for p in pngs(ref)] == [open(p, "rb").read() for p in pngs(folder)]
    latents, labels, info = open_cache(os.path.join(folder, "latents"))
    assert list(labels) == [c for c in range(9) for _ in range(PER_CLASS)] and info["classes"] == PATHMNIST_CLASSES
    pipe = load_pipeline(tiny)
    images = torch.stack([read_image(p) for p in pngs(folder)]).float()        # (18, 3, 64, 64)
    with torch.no_grad():
        mean, _ = pipe.vae.encode(images / 127.5 - 1)
    torch.testing.assert_close(torch.from_numpy(np.array(latents)), mean * pipe.vae_scale, rtol=0, atol=1e-5)

    # the same settings: retraining from scratch reuses the cache; other prior settings are a new set
    stamp = [os.stat(p).st_mtime_ns for p in pngs(folder)]
    train_lora.main(args(tiny, out, "--overwrite"))
    assert len(calls) == 5 and [os.stat(p).st_mtime_ns for p in pngs(folder)] == stamp
    train_lora.main(args(tiny, out, "--guidance", 3, "--overwrite"))
    assert len(calls) == 7 and len(prior_dirs(out)) == 2
    with pytest.raises(UserError, match=r"guidance: 3.0 there, 7.5 here.*--overwrite"):
        train_lora.main(args(tiny, out))
    with pytest.raises(UserError, match=r"prior_loss_weight: 1.0 there, 0.5 here.*--overwrite"):
        train_lora.main(args(tiny, out, "--guidance", 3, "--prior-loss-weight", 0.5))


def test_lora_file_holds_the_identifier_prompts_and_sampling_uses_them(tiny, tmp_path, monkeypatch):
    seen, real = [], lora_train._micro_batch_loss

    def spy(run, idx, dropped, noise, t, offset, prior):
        seen.append((idx, noise, prior))
        return real(run, idx, dropped, noise, t, offset, prior)
    monkeypatch.setattr(lora_train, "_micro_batch_loss", spy)
    out = tmp_path / "run"
    train_lora.main(args(tiny, out, "--prior-loss-weight", 0.5, "--max-steps", 9))
    # 9 steps of 2 are one epoch of the 18 prior images (and of the 18 real ones): each once, in
    # an order and on noise of the prior's own streams
    prior_order = [int(i) for _, _, prior in seen for i in prior[0]]
    assert sorted(prior_order) == list(range(9 * PER_CLASS))
    assert prior_order != [int(i) for idx, _, _ in seen for i in idx]
    assert all(not torch.equal(noise, prior[1]) for _, noise, prior in seen)
    _, meta = load_lora(out / "lora.safetensors")
    instance, prior = identifier_prompts(PATHMNIST_CLASSES)
    assert meta["prompts"] == instance and meta["prior_prompts"] == prior
    assert meta["settings"]["prior_preservation"] is True and meta["settings"]["prior_loss_weight"] == 0.5
    given = SimpleNamespace(classes=None, prompt_template=None)
    assert sample_validated.class_prompts_of(given, PATHMNIST_CLASSES, meta) == dict(enumerate(instance))
    rows = np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1)             # step, loss, lr, s, inst, prior
    assert rows.shape == (9, 6)
    np.testing.assert_allclose(rows[:, 1], rows[:, 4] + 0.5 * rows[:, 5], rtol=1e-6)
    # a plain run's folder is no prior run's: switching is refused, not mixed
    train_lora.main(args(tiny, tmp_path / "plain", prior=False))
    assert "prior_preservation" not in load_lora(tmp_path / "plain" / "lora.safetensors")[1]["settings"]
    with pytest.raises(UserError, match=r"prior_preservation: None there, True here"):
        train_lora.main(args(tiny, tmp_path / "plain"))


def test_resumed_and_torchrun_prior_runs_equal_one_uninterrupted_process(tiny, tmp_path, monkeypatch):
    common = ["--max-steps", 4, "--save-every", 2, "--lr", "1e-4", "--warmup-steps", 0]
    train_lora.main(args(tiny, tmp_path / "one", *common, "--batch-size", 4))
    real_save = lora_train.save_torch

    def crash_after_step_2(path, obj):
        real_save(path, obj)
        if obj["step"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(lora_train, "save_torch", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_lora.main(args(tiny, tmp_path / "resumed", *common, "--batch-size", 4))
    monkeypatch.setattr(lora_train, "save_torch", real_save)
    train_lora.main(args(tiny, tmp_path / "resumed", *common, "--batch-size", 4))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_lora.py"),
                        *args(tiny, tmp_path / "ddp", *common, "--batch-size", 2, "--device", "cpu")],
                       capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    one, resumed, ddp = (load_lora(tmp_path / d / "lora.safetensors")[0] for d in ("one", "resumed", "ddp"))
    assert one.keys() == resumed.keys() == ddp.keys()
    assert all(torch.equal(one[k], resumed[k]) for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-5)
    assert max(v.abs().max() for k, v in one.items() if k.endswith("lora_up.weight")) > 1e-5
    logs = [load_torch(str(tmp_path / d / "checkpoint-000004.pt"))["log"] for d in ("one", "resumed")]
    assert [r[:3] + r[4:] for r in logs[0]] == [r[:3] + r[4:] for r in logs[1]]


@pytest.mark.parametrize("flags, message", [
    (["--prior-preservation", "--prior-loss-weight", "-1"], "--prior-loss-weight must be a finite number >= 0, got -1.0"),
    (["--prior-loss-weight", "2"], "--prior-loss-weight needs --prior-preservation"),
])
def test_bad_prior_flags_are_one_line_and_exit_2(tmp_path, flags, message):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_lora.py"), "--preset", "tiny", "--out", str(out),
                        *flags], capture_output=True, text=True, cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--prior-preservation", "--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number >= 0, got nan"),
    (["--prior-preservation", "--prior-loss-weight", "inf"], "--prior-loss-weight must be a finite number >= 0, got inf"),
    (["--prior-preservation", "--prior-images", "0"], "--prior-images must be at least 1, got 0"),
    (["--prior-images", "5"], "--prior-images needs --prior-preservation"),
])
def test_other_bad_prior_flags_are_refused_before_any_work(tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train_lora.main(["--preset", "tiny", "--out", str(out), *flags])
    assert str(e.value) == message and not out.exists()
