"""medsynth-mini (issue 13, "Done means"), tested from the outside: pretrain.py run as a user runs
it, diffusers as the reference.

  - the folder pretrain.py writes loads with our load_pipeline and with diffusers'
    StableDiffusionPipeline, and both give the same DDIM images; as an original single file the
    UNet (whose config the shapes fix) loads with the same outputs;
  - pretraining killed at chosen points (mid-VAE, mid-write of a UNet state) and rerun ends
    byte for byte where an uninterrupted run ends;
  - a finished run is left alone; other settings into its --out are refused unless --overwrite;
  - a short LoRA run with class prompts lowers the diffusion loss on class prompts.
(Bad input to pretrain.py: the `pretrain/` rows of test_bad_inputs.py.)

The model is examples/medsynth-mini if it is there (the shipped weights), else the one the
reference run of this file pretrains: the smoke preset, shortened, on 32 PathMNIST images.
Script runs fork from one process that imported torch once (_helpers_pipeline.Zygote).
"""
import csv
import hashlib
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _helpers_original import to_original  # noqa: E402
from _helpers_pipeline import EXAMPLE_NPZ, ROOT, Zygote, kill_at_script, script_env, snapshot, temp_files  # noqa: E402
from model.data import class_prompts, load_split, to_model_size  # noqa: E402
from model.lora.files import load_lora  # noqa: E402
from model.lora.layers import inject_lora_weights  # noqa: E402
from model.objective import diffusion_loss  # noqa: E402
from model.sd.loader import load_pipeline  # noqa: E402
from model.sd.sampling import encode_prompts, generate  # noqa: E402

SHIPPED = os.path.join(ROOT, "examples", "medsynth-mini")
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")
# 4 + 4 steps, a state after every step, one sample grid per stage.
TINY = ["--preset", "smoke", "--vae-steps", "4", "--unet-steps", "4", "--save-every", "1",
        "--sample-every", "4", "--vae-batch-size", "4", "--unet-batch-size", "4"]
# Where a run dies (_helpers_pipeline.KILL_AT). Saves: vae steps 1-4 are calls 1-4, unet steps 1-4
# calls 5-8; state.pt writes likewise.
KILLS = {"vae-after-step-2": "call:model.mini.loop.save:3",       # VAE state at step 2, step 3 done
         "unet-state-half-written": "write:state.pt:6"}           # UNet state at step 1, step 2's half
PROMPTS = ["an H&E stained histopathology image",
           "an H&E stained histopathology image of colorectal adipose tissue"]
PX = 32


# -------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder with data.npz: 32 train / 8 val / 8 test images of the bundled subset (the VAE
    encodes the train split x8 before the UNet stage: fewer images, a faster run)."""
    folder = str(tmp_path_factory.mktemp("mini"))
    src = np.load(EXAMPLE_NPZ)
    sizes = {"train": 32, "val": 8, "test": 8}
    np.savez(os.path.join(folder, "data.npz"), **{f"{s}_{k}": src[f"{s}_{k}"][:n]
                                                  for s, n in sizes.items() for k in ("images", "labels")})
    return folder


def pretrain_argv(root, *extra):
    # --out is relative and every run has its own cwd: the recorded command is the same for all
    return [*TINY, "--data", os.path.join(root, "data.npz"), "--out", "run", *extra]


def shown(job):
    return f"exit {job.returncode}\n--- stdout:\n{job.stdout[-2000:]}\n--- stderr:\n{job.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(zygote, root):
    """The uninterrupted run: root/ref/run."""
    case = os.path.join(root, "ref")
    os.makedirs(case)
    job = zygote.run("pretrain.py", pretrain_argv(root), cwd=case)
    assert job.returncode == 0, shown(job)
    return os.path.join(case, "run")


@pytest.fixture(scope="module")
def mini(reference):
    """The model under test: the shipped one if it is in the repository, else the reference's."""
    if os.path.isfile(os.path.join(SHIPPED, "model_index.json")):
        return SHIPPED
    return os.path.join(reference, "model")


# ------------------------------------------------------------ 1. both loaders, the same images

def run_diffusers(folder, seeds, **kw):
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    # one CPU generator per image: diffusers then draws each image's initial latents as we do
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return ref, ref(generator=gens, output_type="pt", **kw).images


def test_mini_loads_in_both_pipelines_and_ddim_images_match_diffusers(mini):
    pipe = load_pipeline(mini)
    seeds = [3, 7]
    ours, _ = generate(pipe, PROMPTS, seeds, steps=4, guidance=3.0, height=PX, width=PX)
    ref, theirs = run_diffusers(mini, seeds, prompt=PROMPTS, num_inference_steps=4, guidance_scale=3.0,
                                height=PX, width=PX)
    assert ours.shape == theirs.shape == (2, 3, PX, PX)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the comparison is not between constants
    # the measured VAE scale is what both read, and what the run recorded
    info = json.load(open(os.path.join(mini, "pretrain.json")))
    assert pipe.vae_scale == ref.vae.config.scaling_factor == pytest.approx(info["vae_scale"])
    assert pipe.vae_scale != 1.0  # the config's placeholder was replaced by the measured one


def test_mini_as_an_original_single_file_keeps_its_unet(mini, tmp_path):
    """A single file stores no config: the loader reads shapes and assumes the published SD
    choices (32 GroupNorm groups, 64-channel text heads, scaling factor 0.18215). Mini's UNet
    fits those, so it must load bit for bit; its VAE (16 groups) and text encoder (4 heads) do
    not, so those are only loaded here, not compared."""
    folder = load_pipeline(mini)
    config = {n: json.load(open(os.path.join(mini, n, "config.json"))) for n in ("unet", "vae")}
    state = to_original(folder.unet.state_dict(), config["unet"], folder.vae.state_dict(), config["vae"],
                        folder.text_encoder.state_dict(), "sd1")
    path = str(tmp_path / "mini.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    single = load_pipeline(path, tokenizer=os.path.join(mini, "tokenizer"))
    assert single.kind == "sd1"
    g = torch.Generator().manual_seed(0)
    side = config["unet"]["sample_size"]
    x, t = torch.randn(2, config["unet"]["in_channels"], side, side, generator=g), torch.tensor([10, 700])
    hidden = encode_prompts(folder, PROMPTS)
    with torch.no_grad():
        want, got = folder.unet(x, t, hidden), single.unet(x, t, hidden)
    assert want.abs().max() > 0 and ((got - want).abs().max() / want.abs().max()).item() <= 1e-6


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model_index.json")),
                    reason="examples/medsynth-mini is not in the repository yet")
def test_shipped_mini_is_small_and_its_card_names_its_weights():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size <= 50 * 2 ** 20, f"{size / 2 ** 20:.1f} MB"
    outer = hashlib.sha256(b"".join(sha(os.path.join(SHIPPED, rel)).encode() for rel in WEIGHTS)).hexdigest()
    assert json.load(open(os.path.join(SHIPPED, "pretrain.json")))["fingerprint"] == outer
    assert outer in open(os.path.join(SHIPPED, "MODEL_CARD.md")).read()


# ------------------------------------------------------------------ 2. kill, rerun, same bytes

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def without_timing(rel, path):
    """A file's content with what a resumed run may change: wall-clock seconds."""
    if rel.endswith(".pt"):
        state = torch.load(path, weights_only=True)
        state.pop("seconds")
        state["log"] = [row[:3] for row in state["log"]]   # step, loss, lr (4th: seconds)
        return state
    if rel.endswith("loss.csv"):
        with open(path) as f:
            return [row[:3] for row in csv.reader(f)]
    if rel.endswith("pretrain.json"):
        info = json.load(open(path))
        return {k: v for k, v in info.items() if k not in ("wall_seconds", "vae_seconds")}
    if rel.endswith("MODEL_CARD.md"):
        return re.sub(r"[\d.]+ min", "_ min", open(path).read())
    with open(path, "rb") as f:
        return f.read()


def same(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: differs"


def files(folder):
    return {k for k, v in snapshot(folder, content=False).items() if v[0] is not None}


@pytest.mark.parametrize("point", list(KILLS))
def test_pretraining_killed_and_rerun_equals_uninterrupted(zygote, root, reference, point):
    case = os.path.join(root, point)
    os.makedirs(case)
    argv = pretrain_argv(root)
    env = script_env(KILL_SCRIPT=os.path.join(ROOT, "pretrain.py"), KILL_POINT=KILLS[point])
    killed = zygote.run(kill_at_script(os.path.join(case, "kill_at.py")), argv, cwd=case, env=env)
    run = os.path.join(case, "run")
    assert killed.returncode == -signal.SIGKILL, f"the kill point was never reached\n{shown(killed)}"
    assert not os.path.exists(os.path.join(run, "model", "pretrain.json"))
    stage, step = ("vae", 2) if point.startswith("vae") else ("unet", 1)
    assert torch.load(os.path.join(run, stage, "state.pt"), weights_only=True)["step"] == step
    if point.endswith("half-written"):
        assert temp_files(run), "a kill mid-write leaves its temp file (the rerun must remove it)"

    resumed = zygote.run("pretrain.py", argv, cwd=case)
    assert resumed.returncode == 0, shown(resumed)
    assert f"{stage}: resuming from" in resumed.stdout + resumed.stderr, shown(resumed)
    assert temp_files(run) == []
    assert files(run) == files(reference), f"other files: {sorted(files(run) ^ files(reference))}"
    for rel in sorted(files(reference)):
        same(without_timing(rel, os.path.join(run, rel)), without_timing(rel, os.path.join(reference, rel)), rel)
    # the words: the three weights files equal, and the fingerprints, which are theirs
    ref_info = json.load(open(os.path.join(reference, "model", "pretrain.json")))
    got_info = json.load(open(os.path.join(run, "model", "pretrain.json")))
    for rel in WEIGHTS:
        assert sha(os.path.join(run, "model", rel)) == sha(os.path.join(reference, "model", rel)), rel
    outer = hashlib.sha256(b"".join(sha(os.path.join(run, "model", rel)).encode() for rel in WEIGHTS))
    assert got_info["fingerprint"] == ref_info["fingerprint"] == outer.hexdigest()


# ------------------------------------------------------ 3. a finished run; other settings; overwrite

def one_error_line(job):
    lines = [ln for ln in job.stderr.split("\n") if ln.strip()]
    assert job.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), shown(job)
    assert "Traceback" not in job.stdout + job.stderr, shown(job)
    return lines[0]


def test_finished_run_is_left_alone_and_other_settings_need_overwrite(zygote, root, reference):
    case = os.path.dirname(reference)
    before = snapshot(case)
    again = zygote.run("pretrain.py", pretrain_argv(root), cwd=case)
    assert again.returncode == 0 and "nothing to do" in again.stdout, shown(again)
    assert snapshot(case) == before, "a rerun of a finished run rewrote files"

    other = zygote.run("pretrain.py", pretrain_argv(root, "--unet-steps", "2"), cwd=case)
    line = one_error_line(other)
    assert re.search(r"pretrained with other settings \(unet_steps\).*--overwrite", line), line
    assert snapshot(case) == before, "a refused run wrote files"

    # --overwrite starts over, in a copy (the reference stays for the other tests)
    copy = os.path.join(root, "overwrite")
    shutil.copytree(case, copy)
    fresh = zygote.run("pretrain.py", pretrain_argv(root, "--unet-steps", "2", "--overwrite"), cwd=copy)
    assert fresh.returncode == 0, shown(fresh)
    info = json.load(open(os.path.join(copy, "run", "model", "pretrain.json")))
    assert info["recipe"]["unet_steps"] == 2
    assert len(torch.load(os.path.join(copy, "run", "unet", "state.pt"), weights_only=True)["log"]) == 2


def test_killed_run_resumed_with_other_settings_is_refused(zygote, root):
    """A run killed in its UNet stage, rerun with another UNet step count: refused in one line,
    and its state is not touched."""
    case = os.path.join(root, "other-settings")
    os.makedirs(case)
    env = script_env(KILL_SCRIPT=os.path.join(ROOT, "pretrain.py"), KILL_POINT="call:model.mini.loop.save:6")
    killed = zygote.run(kill_at_script(os.path.join(case, "kill_at.py")), pretrain_argv(root), cwd=case, env=env)
    assert killed.returncode == -signal.SIGKILL, shown(killed)
    before = snapshot(os.path.join(case, "run"))
    job = zygote.run("pretrain.py", pretrain_argv(root, "--unet-steps", "5"), cwd=case)
    line = one_error_line(job)
    assert re.search(r"unet/state\.pt is a run with other settings \(unet_steps\)", line), line
    after = snapshot(os.path.join(case, "run"))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the refused run wrote: {changed}"


def test_half_precision_paths_run_on_cpu(zygote, root):
    """The --mixed-precision logic that --device cuda uses, run where it can be: bf16 autocast on
    CPU trains both stages to finite weights; fp16 (CUDA-only, with loss scaling) is refused in one
    line before anything is written."""
    case = os.path.join(root, "bf16")
    os.makedirs(case)
    job = zygote.run("pretrain.py", pretrain_argv(root, "--mixed-precision", "bf16"), cwd=case)
    assert job.returncode == 0, shown(job)
    state = torch.load(os.path.join(case, "run", "unet", "state.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["ema"].values() if t.is_floating_point())
    assert state["ema"]["conv_in.weight"].dtype == torch.float32  # autocast: weights stay fp32
    ref = torch.load(os.path.join(root, "ref", "run", "unet", "state.pt"), weights_only=True)
    assert not torch.equal(state["ema"]["conv_in.weight"], ref["ema"]["conv_in.weight"])  # bf16 did run
    fp16 = os.path.join(root, "fp16")
    os.makedirs(fp16)
    line = one_error_line(zygote.run("pretrain.py", pretrain_argv(root, "--mixed-precision", "fp16"), cwd=fp16))
    assert "fp16 needs a CUDA GPU" in line
    assert not os.path.exists(os.path.join(fp16, "run", "vae"))


# ------------------------------------------------------------- 5. LoRA lowers the class-prompt loss

LORA_STEPS = 30


@torch.no_grad()
def class_prompt_loss(pipe, latents, cond, seed=1234, repeats=8):
    """Mean epsilon-MSE over `repeats` fixed draws of noise and timesteps per image (no offset
    noise, no SNR weighting): the same numbers for every model it is asked about."""
    g = torch.Generator().manual_seed(seed)
    x0, c = latents.repeat(repeats, 1, 1, 1), cond.repeat(repeats, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, pipe.scheduler.num_train_timesteps, (len(x0),), generator=g)
    return diffusion_loss(pipe.unet, pipe.scheduler, x0, c, noise, t, None, 0.0, 0.0).item()


def test_short_lora_run_lowers_the_loss_on_class_prompts(zygote, mini, root):
    """train_lora.py on mini at 32 px, 4 images per class, a high learning rate for few steps."""
    out = os.path.join(root, "lora")
    argv = ["--model", mini, "--data", EXAMPLE_NPZ, "--few-shot", "4", "--resolution", str(PX),
            "--max-steps", str(LORA_STEPS), "--batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
            "--warmup-steps", "2", "--save-every", str(LORA_STEPS), "--sample-every", "0", "--out", out]
    job = zygote.run("train_lora.py", argv, cwd=root)
    assert job.returncode == 0, shown(job)
    state, meta = load_lora(os.path.join(out, "lora.safetensors"))

    pipe = load_pipeline(mini)
    data = load_split(EXAMPLE_NPZ, "train", few_shot=4, seed=0)     # the LoRA's 36 training images
    prompts = class_prompts(data.classes)
    assert meta["prompts"] == prompts                                # it trained on class prompts
    x = to_model_size(data.images.float() / 127.5 - 1, PX)          # (36, 3, 32, 32) in [-1, 1]: the size path
    with torch.no_grad():
        latents = pipe.vae.encode(x)[0] * pipe.vae_scale            # (36, C, 32/f, 32/f)
        cond = encode_prompts(pipe, prompts)[data.labels]           # (36, 77, D)
    before = class_prompt_loss(pipe, latents, cond)
    inject_lora_weights(pipe.unet, pipe.text_encoder, state)
    after = class_prompt_loss(pipe, latents, cond)
    # paired: the same noise and timesteps before and after, so any drop is the LoRA's
    assert after < before, f"diffusion loss on class prompts: {before:.4f} -> {after:.4f}"
