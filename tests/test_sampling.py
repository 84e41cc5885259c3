"""Text-to-image: our load_pipeline + generate against diffusers' StableDiffusionPipeline on tiny
random models, per-image seeding, early dropping of candidates, the tiny preset and the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from _helpers_sd import (diffusers_kwargs, relative_error, tiny_clip_config, tiny_unet_config,  # noqa: E402
                         tiny_vae_config)
from model.sd.loader import load_pipeline  # noqa: E402
from model.io import cli  # noqa: E402
from model.sd.sampling import encode_prompts, generate, to_pil  # noqa: E402
from model.sd.tiny import make_tiny_sd, make_tiny_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["an H&E stained image of adipose tissue",
           "an H&E stained image of colorectal adenocarcinoma epithelium"]
SD15_DDIM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
PX = 32  # tiny helper VAE downsamples x4: 8x8 latents


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    """Tiny random SD1-style pipeline built and saved by diffusers (save_pretrained)."""
    folder = str(tmp_path_factory.mktemp("sd1"))
    torch.manual_seed(0)
    make_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    ref = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**diffusers_kwargs(tiny_unet_config("sd1"))),
        vae=AutoencoderKL(**diffusers_kwargs(tiny_vae_config())),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny_clip_config("sd1"))),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        scheduler=DDIMScheduler(**SD15_DDIM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.save_pretrained(folder, safe_serialization=True)
    return folder


def run_diffusers(folder, seeds, **kw):
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # one CPU generator per image: diffusers then draws latents and eta-noise per image as we do
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return ref(generator=gens, output_type="pt", **kw).images


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_generate_matches_diffusers_pipeline(sd1_folder, eta):
    pipe = load_pipeline(sd1_folder)
    seeds = [3, 7]
    ours, kept = generate(pipe, PROMPTS, seeds, steps=4, guidance=7.5, eta=eta, height=PX, width=PX,
                          negative_prompt="blurry")
    ref = run_diffusers(sd1_folder, seeds, prompt=PROMPTS, num_inference_steps=4, guidance_scale=7.5,
                        eta=eta, height=PX, width=PX, negative_prompt=["blurry"] * 2)
    assert ours.shape == ref.shape == (2, 3, PX, PX) and kept.tolist() == [0, 1]
    assert relative_error(ours, ref) <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the comparison is not between constants


def test_tiny_preset_sd2_loads_in_diffusers_and_matches(tmp_path):
    """make_tiny_sd writes a folder diffusers itself loads (no diffusers used to write it), and
    both pipelines generate the same image from it: v-prediction, linear projections."""
    folder = make_tiny_sd(str(tmp_path / "tiny"), kind="sd2", seed=1)
    pipe = load_pipeline(folder)
    assert pipe.prediction_type == "v_prediction"
    ours, _ = generate(pipe, PROMPTS[:1], [5], steps=3, guidance=4.0, height=64, width=64)
    ref = run_diffusers(folder, [5], prompt=PROMPTS[:1], num_inference_steps=3, guidance_scale=4.0,
                        height=64, width=64)
    assert relative_error(ours, ref) <= 1e-4


def test_tiny_preset_tokenizer_and_256px_generation(tmp_path):
    folder = make_tiny_sd(str(tmp_path / "tiny"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ids = tok(PROMPTS[0], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "an h & e stained image of adipose tissue"
    assert len(tok("x" * 200, truncation=True, max_length=77).input_ids) == 77

    pipe = load_pipeline(folder)
    images, _ = generate(pipe, PROMPTS[:1], [0], steps=2, height=256, width=256)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 1e-3
    # same seed -> same weights, different seed -> different weights
    again = make_tiny_sd(str(tmp_path / "again"))
    other = make_tiny_sd(str(tmp_path / "other"), seed=1)
    for name in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"]:
        read = lambda f: open(os.path.join(f, name), "rb").read()  # noqa: E731
        assert read(folder) == read(again) != read(other), name


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folder):
    return load_pipeline(tiny_folder)


def assert_same_png(a, b):
    """Equal as 8-bit images, up to rounding flips: batched CPU convolutions (oneDNN) differ by
    ~1e-6 with the batch size, which can move a pixel across a rounding boundary."""
    assert (a - b).abs().max() <= 1e-5
    for x, y in zip(to_pil(a), to_pil(b)):
        assert_same_pixels(x, y)


def assert_same_pixels(x, y):
    diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_each_image_depends_only_on_its_own_seed(tiny_pipe, eta):
    kw = dict(steps=3, guidance=7.5, eta=eta, height=64, width=64)
    batch, _ = generate(tiny_pipe, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [10, 11, 12], **kw)
    alone, _ = generate(tiny_pipe, [PROMPTS[1]], [11], **kw)
    other_batch, _ = generate(tiny_pipe, [PROMPTS[1], PROMPTS[1]], [99, 11], **kw)
    assert_same_png(batch[1:2], alone)
    assert_same_png(other_batch[1:2], alone)
    assert (batch[0] - batch[2]).abs().max() > 1e-2  # seeds matter
    again, _ = generate(tiny_pipe, [PROMPTS[1]], [11], **kw)
    assert torch.equal(again, alone)  # same call, same machine: bit-exact


def test_precomputed_embeddings_and_on_ddim_step_dropping(tiny_pipe):
    kw = dict(steps=4, guidance=7.5, eta=1.0, height=64, width=64)
    prompts, seeds = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [1, 2, 3]
    full, _ = generate(tiny_pipe, prompts, seeds, **kw)
    table = encode_prompts(tiny_pipe, PROMPTS)  # (2, 77, D): each class prompt encoded once
    same, _ = generate(tiny_pipe, None, seeds, prompt_embeds=table[[0, 1, 0]],
                       negative_embeds=encode_prompts(tiny_pipe, [""]), **kw)
    assert torch.equal(same, full)

    seen = []

    def drop_middle_at_step_1(i, t, pred_x0):
        seen.append((i, t, pred_x0.shape[0]))
        return torch.tensor([True, False, True]) if i == 1 else None

    kept_images, kept = generate(tiny_pipe, prompts, seeds, on_ddim_step=drop_middle_at_step_1, **kw)
    assert kept.tolist() == [0, 2]
    assert [n for _, _, n in seen] == [3, 3, 2, 2]  # dropped right after step 1
    assert [t for _, t, _ in seen] == tiny_pipe.scheduler.timesteps.tolist()
    assert_same_png(kept_images, full[[0, 2]])

    none_left, kept = generate(tiny_pipe, prompts, seeds, on_ddim_step=lambda *a: [False] * 3, **kw)
    assert none_left.shape == (0, 3, 64, 64) and kept.numel() == 0


def test_cli_writes_pngs_equal_to_generate(tiny_folder, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "sample_validated.py"), "--model", tiny_folder,
           "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "3", "--batch-size", "2",
           "--steps", "2", "--height", "64", "--width", "48", "--seed", "5", "--out", str(out),
           "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(out))
    assert files == ["txt2img_0.png", "txt2img_1.png", "txt2img_2.png"]
    expected, _ = generate(tiny_pipe, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [5, 6, 7], steps=2,
                           height=64, width=48)
    for f, e in zip(files, to_pil(expected)):
        img = Image.open(out / f)
        assert img.size == (48, 64)
        assert_same_pixels(img, e)  # the CLI ran batches [0, 1], [2]: same up to rounding flips



def test_cli_bad_input_is_one_line_error(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, ROOT)
    import sample_validated
    for argv, message in [(["--model", str(tmp_path / "missing"), "--prompt", "x"], "missing: no such file"),
                          (["--model", str(tmp_path)], "--prompt")]:
        monkeypatch.setattr(sys, "argv", ["sample_validated.py", *argv, "--out", str(tmp_path / "o")])
        with pytest.raises(SystemExit) as e:
            cli(sample_validated.main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and message in err
        assert err.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "o")
