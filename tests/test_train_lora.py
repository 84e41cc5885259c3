"""train_lora.py end to end on the tiny random SD and real PathMNIST images: the loss goes down,
resume is exact, finished runs are kept, NaN stops cleanly, torchrun (gloo) equals one process."""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_lora
from model import objective
from model.lora import train as lora_train
from model.sd.loader import load_pipeline
from model.data import class_prompts
from model.io import UserError, load_torch
from model.lora.latent_cache import open_cache
from model.lora.files import load_lora
from model.lora.layers import inject_lora_weights
from model.sd.sampling import tokenize
from model.sd.tiny import make_tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = os.path.join(ROOT, "..", "shared", "data", "pathmnist_subset_28.npz")
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny") / "sd"))


def args(tiny, out, *extra):
    return ["--preset", "tiny", "--model", tiny, "--data", SUBSET, "--out", str(out),
            "--resolution", "64", "--sample-every", "0", *map(str, extra)]


def lora_tensors(path):
    state, _ = load_lora(path)
    return state


@torch.no_grad()
def fixed_batch_loss(tiny, out, lora_path=None, n=128):
    """Epsilon-prediction MSE on fixed latents, noise and timesteps, written out independently of
    model/lora/train.py: x_t = sqrt(a) x0 + sqrt(1 - a) eps, loss = |unet(x_t) - eps|^2."""
    pipe = load_pipeline(tiny)
    if lora_path:
        inject_lora_weights(pipe.unet, pipe.text_encoder, load_lora(lora_path)[0])
    latents, labels, info = open_cache(glob.glob(os.path.join(out, "latents-*"))[0])
    g = torch.Generator().manual_seed(1234)
    pick = torch.randperm(len(labels), generator=g)[:n].numpy()
    x0 = torch.from_numpy(latents[pick].copy())
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(pick),), generator=g)
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    tok = pipe.tokenizer(class_prompts(info["classes"]), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(tok)[0][torch.from_numpy(labels[pick])]
    pred = pipe.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, cond)
    return (pred - eps).pow(2).mean().item()


def test_tiny_training_lowers_the_loss(tiny, tmp_path):
    out = tmp_path / "run"
    train_lora.main(args(tiny, out, "--few-shot", 16, "--max-steps", 100, "--save-every", 50,
                         "--sample-every", 100, "--noise-offset", 0))
    base = fixed_batch_loss(tiny, out)
    mid = fixed_batch_loss(tiny, out, out / "lora-000050.safetensors")
    end = fixed_batch_loss(tiny, out, out / "lora.safetensors")
    print(f"fixed-batch loss: base {base:.4f}, step 50 {mid:.4f}, step 100 {end:.4f}")
    assert end < mid < base and end < 0.97 * base
    rows = np.loadtxt(out / "loss.csv", delimiter=",", skiprows=1)
    assert rows.shape == (100, 4) and list(rows[:, 0]) == list(range(1, 101))
    assert os.path.getsize(out / "loss.png") > 0 and os.path.isfile(out / "samples" / "step-000100.png")
    _, meta = load_lora(out / "lora.safetensors")
    assert meta["steps"] == 100 and len(meta["classes"]) == len(meta["prompts"]) == 9
    assert meta["settings"]["rank"] == 4 and meta["base_model"] == tiny


def test_resume_after_a_crash_reaches_the_same_lora(tiny, tmp_path, monkeypatch):
    extra = ["--few-shot", 4, "--max-steps", 6, "--save-every", 2, "--batch-size", 2,
             "--grad-accum", 2, "--snr-gamma", 5, "--targets", "unet_attn,text_attn"]
    train_lora.main(args(tiny, tmp_path / "a", *extra))

    real_save = lora_train.save_torch

    def crash_after_step_4(path, obj):
        real_save(path, obj)
        if obj["step"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(lora_train, "save_torch", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_lora.main(args(tiny, tmp_path / "b", *extra))
    monkeypatch.setattr(lora_train, "save_torch", real_save)
    assert not os.path.exists(tmp_path / "b" / "lora.safetensors")
    train_lora.main(args(tiny, tmp_path / "b", *extra))  # the same command again: resumes at 4

    a, b = lora_tensors(tmp_path / "a" / "lora.safetensors"), lora_tensors(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = (load_torch(str(d / "checkpoint-000006.pt"))["log"] for d in (tmp_path / "a", tmp_path / "b"))
    assert [r[:3] for r in log_a] == [r[:3] for r in log_b]


def test_finished_run_is_kept_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run = args(tiny, out, "--few-shot", 2, "--max-steps", 2)
    train_lora.main(run)
    final = out / "lora.safetensors"
    stamp = os.stat(final).st_mtime_ns
    train_lora.main(run)
    assert "nothing to do" in capsys.readouterr().out and os.stat(final).st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"lr: 0.001 there, 0.002 here.*--overwrite"):
        train_lora.main(run + ["--lr", "0.002"])
    with pytest.raises(UserError, match=r"caption_dropout: 0.1 there, 0.2 here.*--overwrite"):
        train_lora.main(run + ["--caption-dropout", "0.2"])
    assert os.stat(final).st_mtime_ns == stamp
    train_lora.main(run + ["--lr", "0.002", "--overwrite"])
    assert load_lora(final)[1]["settings"]["lr"] == 0.002


def test_nan_loss_stops_with_one_line_error_and_keeps_checkpoints(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_lora.py"),
           *args(tiny, out, "--few-shot", 2, "--max-steps", 6, "--save-every", 1, "--batch-size", 2,
                 "--lr", "1e30", "--warmup-steps", 0, "--max-grad-norm", 0)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 2, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "loss became" in error[0] and "checkpoint-" in error[0], r.stderr[-2000:]
    kept = sorted(glob.glob(str(out / "checkpoint-*.pt")))
    assert kept and not os.path.exists(out / "lora.safetensors")
    last = load_torch(kept[-1])
    assert np.isfinite([row[1] for row in last["log"]]).all()


def test_bad_data_is_a_clear_error(tiny, tmp_path, monkeypatch):
    bad = tmp_path / "bad.npz"
    np.savez(bad, val_images=np.zeros((2, 28, 28, 3), np.uint8), val_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(UserError, match="missing key 'train_images'"):
        train_lora.main(args(tiny, tmp_path / "a") + ["--data", str(bad)])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "pathmnist.npz").write_bytes(b"not the official file")
    monkeypatch.setenv("MEDSYNTH_CACHE", str(cache))
    with pytest.raises(UserError, match="MD5"):
        train_lora.main(args(tiny, tmp_path / "b") + ["--data", "pathmnist"])


def test_v_prediction_model_with_bf16_autocast_keeps_lora_float32(tmp_path):
    """SD2-style tiny model (v-prediction, linear projections), bf16 autocast as on a GPU."""
    tiny_v = make_tiny_sd(str(tmp_path / "sd2"), kind="sd2")
    out = tmp_path / "run"
    train_lora.main(args(tiny_v, out, "--few-shot", 2, "--max-steps", 2, "--batch-size", 2, "--snr-gamma", 5,
                         "--mixed-precision", "bf16", "--targets", "unet_attn,unet_proj,text_attn"))
    assert load_lora(out / "lora.safetensors")[1]["prediction_type"] == "v_prediction"
    ckpt = load_torch(str(out / "checkpoint-000002.pt"))
    assert all(v.dtype == torch.float32 for v in ckpt["lora"].values())
    assert np.isfinite([row[1] for row in ckpt["log"]]).all()
    state = lora_tensors(out / "lora.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))


def test_torchrun_two_processes_match_one_process(tiny, tmp_path):
    common = ["--few-shot", 4, "--max-steps", 3, "--lr", "1e-4", "--save-every", 3]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_lora.py"),
                        *args(tiny, tmp_path / "ddp", *common, "--batch-size", 2, "--device", "cpu")],
                       capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 = 2 per rank x 2 rank(s) x 1 accumulation" in r.stdout, r.stdout
    train_lora.main(args(tiny, tmp_path / "one", *common, "--batch-size", 4))
    train_lora.main(args(tiny, tmp_path / "accum", *common, "--batch-size", 2, "--grad-accum", 2))
    ddp = lora_tensors(tmp_path / "ddp" / "lora.safetensors")
    for other in ("one", "accum"):
        ref = lora_tensors(tmp_path / other / "lora.safetensors")
        assert ddp.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=1e-5)
    moved = lora_tensors(tmp_path / "one" / "lora.safetensors")
    assert max(v.abs().max() for k, v in moved.items() if k.endswith("lora_up.weight")) > 1e-5


def test_default_file_is_kohya_and_diffusers_reads_it_as_our_merge(tiny, tmp_path):
    """Defect b: with default flags the LoRA file is kohya-format, the one layout diffusers,
    ComfyUI and A1111 all read, and diffusers' load_lora_weights on it gives our merged UNet."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from safetensors import safe_open
    from model.lora.layers import merge_lora
    out = tmp_path / "run"
    train_lora.main(args(tiny, out, "--few-shot", 2, "--max-steps", 2, "--batch-size", 2, "--lr", "1e-2",
                         "--warmup-steps", 0))
    path = str(out / "lora.safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    kohya = re.compile(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert keys and all(kohya.fullmatch(k) for k in keys), keys[:3]
    assert any(k.endswith(".alpha") for k in keys)

    ours = load_pipeline(tiny)
    inject_lora_weights(ours.unet, ours.text_encoder, load_lora(path)[0])
    merge_lora(ours.unet)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None,
                                                            requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    sample, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base = ref.unet(sample, t, ctx).sample
        ref.load_lora_weights(path)
        want = ref.unet(sample, t, ctx).sample
        got = ours.unet(sample, t, ctx)
    assert (want - base).abs().max() > 1e-3  # the trained LoRA really changes the UNet
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("p", [1.0, 0.0])
def test_caption_dropout_trains_on_the_empty_prompt(tiny, tmp_path, monkeypatch, p):
    """--caption-dropout 1: every sample is conditioned on the embedding of ""; 0: none is."""
    seen, real_loss = [], lora_train.diffusion_loss

    def spy(unet, scheduler, x0, cond, *rest):
        seen.append(cond.detach().float().clone())              # (b, 77, D)
        return real_loss(unet, scheduler, x0, cond, *rest)
    monkeypatch.setattr(lora_train, "diffusion_loss", spy)
    out = tmp_path / "run"
    train_lora.main(args(tiny, out, "--few-shot", 2, "--max-steps", 3, "--batch-size", 4,
                         "--caption-dropout", p))
    pipe = load_pipeline(tiny)
    prompts = load_lora(out / "lora.safetensors")[1]["prompts"]
    with torch.no_grad():
        emb = pipe.text_encoder(tokenize(pipe.tokenizer, prompts + [""]).input_ids)[0]   # (10, 77, D)
    rows = torch.cat(seen)
    assert len(rows) == 3 * 4

    def close(a, b):
        return (a - b).abs().max().item() < 1e-5
    empty = [close(r, emb[-1]) for r in rows]
    a_class = [any(close(r, c) for c in emb[:-1]) for r in rows]
    if p == 1.0:
        assert all(empty) and not any(a_class)
    else:
        assert not any(empty) and all(a_class)


def test_caption_dropout_draw_is_seeded_by_step_and_near_p():
    masks = [objective.caption_dropout_mask(0, step, 64, 0.5) for step in range(100)]
    dropped = torch.cat(masks).float().mean().item()
    assert 0.47 < dropped < 0.53, dropped
    assert torch.equal(objective.caption_dropout_mask(0, 5, 64, 0.5), masks[5])
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(objective.caption_dropout_mask(1, 0, 64, 0.5), masks[0])
    assert objective.caption_dropout_mask(0, 0, 64, 1.0).all()
    assert not objective.caption_dropout_mask(0, 0, 64, 0.0).any()


def test_min_snr_weights_match_diffusers_reference():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from model.sd.ddim import DDIMScheduler
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours, ref = DDIMScheduler(**betas), DDPMScheduler(**betas)
    t = torch.tensor([0, 1, 10, 100, 400, 999])
    snr = compute_snr(ref, t)
    for kind, divisor in (("epsilon", snr), ("v_prediction", snr + 1)):
        # diffusers' examples/text_to_image/train_text_to_image_lora.py, min-SNR branch
        want = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / divisor
        torch.testing.assert_close(objective.snr_weights(ours.alphas_cumprod, t, 5.0, kind), want)


def test_each_epoch_visits_every_image_once():
    idx = objective.sample_indices(10, 3, 0, 30)
    for e in range(3):
        assert sorted(idx[10 * e:10 * e + 10]) == list(range(10))
    assert list(idx[:10]) != list(idx[10:20])
    # any window of positions is the same, however the batch is split
    assert list(objective.sample_indices(10, 3, 7, 9)) == list(idx[7:16])


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_lora.py"), "--help"],
                       capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert r.returncode == 0
    for flag in ("--model", "--data", "--out", "--max-steps", "--rank", "--alpha", "--lr", "--batch-size",
                 "--resolution", "--seed", "--lora-format", "--noise-offset", "--snr-gamma", "--grad-accum",
                 "--grad-checkpointing", "--mixed-precision", "--save-every", "--resume", "--sample-every",
                 "--min-lr", "--few-shot", "--prompt-template", "--preset", "--overwrite", "--targets"):
        assert flag in r.stdout
    assert all(a.help for a in train_lora.build_parser()._actions)
