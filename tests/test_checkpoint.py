"""load_pipeline: tiny random diffusers/transformers models, saved as a diffusers pipeline folder
and as an original single file (tests/_helpers_original.py, written independently of
model/convert.py), load into our networks with the same outputs; bad inputs are one-line errors
naming the file."""
import os
import shutil

import diffusers
import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from _helpers_original import to_original
from _helpers_sd import (diffusers_kwargs, sd15_unet_config, sd15_vae_config, sd21_unet_config,
                         tiny_clip_config, tiny_unet_config, tiny_vae_config)
from model.sd import convert
from model.sd.loader import load_pipeline
from model.io import UserError
from model.sd.tiny import make_tiny_tokenizer

TOL = 1e-5


def configs(kind, single_file):
    """The tiny test configs. A single file stores no config, so there the loader assumes what the
    published SD models have: 32 GroupNorm groups, 64-channel heads in the text encoders and
    SD2 UNet, 8 heads in the SD1 UNet. A folder's config.json is read as is."""
    unet, vae, clip = tiny_unet_config(kind), tiny_vae_config(), tiny_clip_config(kind)
    if single_file:
        unet["norm_num_groups"] = vae["norm_num_groups"] = 32
        clip["num_attention_heads"] = max(1, clip["hidden_size"] // 64)
        if kind == "sd2":
            unet["attention_head_dim"] = [max(1, w // 64) for w in unet["block_out_channels"]]
    return unet, vae, clip


class Reference:
    """Random diffusers UNet/VAE + transformers CLIPTextModel, and their outputs on fixed inputs."""

    def __init__(self, kind, single_file, seed):
        torch.manual_seed(seed)
        self.kind = kind
        self.unet_config, self.vae_config, clip_config = configs(kind, single_file)
        self.unet = diffusers.UNet2DConditionModel(**diffusers_kwargs(self.unet_config)).eval()
        self.vae = diffusers.AutoencoderKL(**diffusers_kwargs(self.vae_config)).eval()
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config)).eval()
        self.ids = torch.randint(0, clip_config["vocab_size"], (2, 77))
        self.latents = torch.randn(2, 4, 8, 8)
        self.t = torch.tensor([10, 700])
        self.images = torch.rand(1, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            self.hidden = self.text_encoder(self.ids).last_hidden_state          # (2, 77, D)
            self.eps = self.unet(self.latents, self.t, self.hidden).sample       # (2, 4, 8, 8)
            dist = self.vae.encode(self.images).latent_dist
            self.mean, self.logvar = dist.mean, dist.logvar                      # (1, 4, 8, 8)
            self.decoded = self.vae.decode(self.latents).sample                  # (2, 3, 32, 32)

    def original_state(self):
        return to_original(self.unet.state_dict(), self.unet_config, self.vae.state_dict(),
                           self.vae_config, self.text_encoder.state_dict(), self.kind)

    def check(self, pipe, tol=TOL):
        """Every network of `pipe` reproduces ours within `tol` (relative to the output scale)."""
        p = next(pipe.unet.parameters())
        cast = dict(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            mean, logvar = pipe.vae.encode(self.images.to(**cast))
            got = {"text_encoder": pipe.text_encoder(self.ids).last_hidden_state,
                   "unet": pipe.unet(self.latents.to(**cast), self.t, self.hidden.to(**cast)),
                   "vae mean": mean, "vae logvar": logvar,
                   "vae decode": pipe.vae.decode(self.latents.to(**cast))}
        want = {"text_encoder": self.hidden, "unet": self.eps, "vae mean": self.mean,
                "vae logvar": self.logvar, "vae decode": self.decoded}
        for name, out in got.items():
            err = (out.float() - want[name]).abs().max().item() / want[name].abs().max().item()
            assert err <= tol, f"{name}: max error {err:.2e} (relative to max |output|)"


def save_folder(ref, folder):
    """diffusers StableDiffusionPipeline.save_pretrained: the layout of a hub snapshot."""
    make_tiny_tokenizer(os.path.join(folder, "src_tokenizer"))
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
        prediction_type="v_prediction" if ref.kind == "sd2" else "epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "src_tokenizer")),
        unet=ref.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(os.path.join(folder, "src_tokenizer"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(kind) -> dict: a Reference saved as a folder and another saved as a single file.
    Built on first use and shared by the module's tests."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            folder_ref = Reference(kind, single_file=False, seed=1)
            file_ref = Reference(kind, single_file=True, seed=2)
            file = str(root / f"{kind}.safetensors")
            save_file({k: v.contiguous() for k, v in file_ref.original_state().items()}, file)
            made[kind] = dict(kind=kind, folder_ref=folder_ref, file_ref=file_ref, file=file,
                              folder=save_folder(folder_ref, str(root / "folder")))
        return made[kind]
    return get


KINDS = pytest.mark.parametrize("kind", ["sd1", "sd2"])


@KINDS
def test_folder_matches_diffusers(models, kind):
    saved = models(kind)
    pipe = load_pipeline(saved["folder"])
    saved["folder_ref"].check(pipe)
    assert pipe.kind == saved["kind"]
    assert pipe.prediction_type == ("v_prediction" if saved["kind"] == "sd2" else "epsilon")
    assert pipe.vae_scale == pytest.approx(0.18215)
    ids = pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)


@KINDS
def test_single_file_matches_diffusers(models, kind):
    saved = models(kind)
    pipe = load_pipeline(saved["file"])
    saved["file_ref"].check(pipe)
    assert pipe.kind == saved["kind"]
    assert pipe.prediction_type == "epsilon"  # not knowable from the weights: the documented default
    with pytest.raises(UserError, match="--tokenizer") as e:
        pipe.tokenizer(["a photo"])
    assert saved["file"] in str(e.value)
    pipe = load_pipeline(saved["file"], tokenizer=saved["folder"], prediction_type="v_prediction")
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.prediction_type == pipe.scheduler.prediction_type == "v_prediction"


@pytest.mark.parametrize("layout", ["folder", "file"])
def test_bfloat16_loads_in_bfloat16(models, layout):
    saved = models("sd2")
    pipe = load_pipeline(saved[layout], dtype=torch.bfloat16)
    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    saved[layout + "_ref"].check(pipe, tol=0.05)  # bf16 keeps ~3 digits; wrong weights: ~100% off


def test_released_layouts_load(models, tmp_path):
    """What older files on the hub look like: text encoder keys under `text_model.` (transformers
    < 5.6) with position_ids, VAE attention as query/key/value/proj_attn (diffusers < 0.15), and
    .bin weights; and a Lightning-style .ckpt holding a plain state dict."""
    saved = models("sd1")
    folder = shutil.copytree(saved["folder"], tmp_path / "old")
    path = folder / "text_encoder" / "model.safetensors"
    state = _read(path)
    state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(path))
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = _read(path)
    save_file({_replace_all(k, old) if "mid_block.attentions" in k else k: v for k, v in state.items()},
              str(path))
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(_read(path), folder / "unet" / "diffusion_pytorch_model.bin")
    os.remove(path)
    saved["folder_ref"].check(load_pipeline(str(folder)))

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": saved["file_ref"].original_state(), "global_step": 1000}, ckpt)
    saved["file_ref"].check(load_pipeline(str(ckpt)))


class Pickled:
    """Any non-tensor object: unpickling it would run code chosen by the file."""


def test_pickled_ckpt_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Pickled()}, path)
    with pytest.raises(UserError, match="weights_only") as e:
        load_pipeline(str(path))
    assert str(path) in str(e.value)


def test_hub_id_offline(models, tmp_path, monkeypatch):
    """Offline: a cached snapshot loads (model and tokenizer ids), an uncached id is one line."""
    saved = models("sd1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="run once with network access") as e:
        load_pipeline("medsynth-tests/not-cached")
    assert "medsynth-tests/not-cached" in str(e.value)
    repo = tmp_path / "models--medsynth-tests--tiny-sd"
    shutil.copytree(saved["folder"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pipe = load_pipeline("medsynth-tests/tiny-sd")
    saved["folder_ref"].check(pipe)
    pipe = load_pipeline(saved["file"], tokenizer="medsynth-tests/tiny-sd")
    assert isinstance(pipe.tokenizer, CLIPTokenizer)


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _replace_all(key, table):
    for a, b in table.items():
        key = key.replace(a, b)
    return key


UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
BAD_WEIGHTS = [  # (file in the folder, key, new tensor or None to delete the key, message part)
    (UNET_FILE, "conv_in.bias", None, "1 missing keys (conv_in.bias)"),
    (UNET_FILE, "conv_in.weight", torch.zeros(32, 5, 3, 3),
     "unet: conv_in.weight: checkpoint has (32, 5, 3, 3), model expects (32, 4, 3, 3)"),
    ("vae/diffusion_pytorch_model.safetensors", "extra.weight", torch.zeros(1),
     "1 unexpected keys (extra.weight)"),
]


@pytest.mark.parametrize("target,key,value,message", BAD_WEIGHTS, ids=["missing", "shape", "extra"])
def test_bad_folder_weights(models, tmp_path, target, key, value, message):
    folder = shutil.copytree(models("sd1")["folder"], tmp_path / "f")
    state = _read(folder / target)
    if value is None:
        del state[key]
    else:
        state[key] = value
    save_file(state, str(folder / target))
    with pytest.raises(UserError) as e:
        load_pipeline(str(folder))
    assert str(folder / target) in str(e.value) and message in str(e.value), str(e.value)


def test_bad_inputs(models, tmp_path):
    """Each broken input -> UserError, one line, naming the offending path."""
    saved = models("sd1")
    folder, file = saved["folder"], saved["file"]

    def expect(source, named, message, **kwargs):
        with pytest.raises(UserError) as e:
            load_pipeline(str(source), **kwargs)
        text = str(e.value)
        assert "\n" not in text and str(named) in text and message in text, text

    expect(tmp_path / "nope.safetensors", tmp_path / "nope.safetensors", "no such file")
    expect(tmp_path, tmp_path, "not a diffusers Stable Diffusion folder")
    broken = shutil.copytree(folder, tmp_path / "no_unet_weights")
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    expect(broken, broken / "unet", "no weights")
    shutil.rmtree(broken / "vae")
    expect(broken, broken / "vae", "folder not found")
    broken = shutil.copytree(folder, tmp_path / "bad_json")
    (broken / "unet" / "config.json").write_text("{not json")
    expect(broken, broken / "unet" / "config.json", "not valid JSON")

    data = open(file, "rb").read()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    expect(tmp_path / "truncated.safetensors", tmp_path / "truncated.safetensors",
           "not a valid .safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    expect(tmp_path / "text.safetensors", tmp_path / "text.safetensors", "not a valid .safetensors")
    (tmp_path / "model.onnx").write_text("hello")
    expect(tmp_path / "model.onnx", tmp_path / "model.onnx", "unknown weights format")
    unet_only = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    expect(unet_only, unet_only, "not an original Stable Diffusion 1.x/2.x checkpoint")

    state = saved["file_ref"].original_state()
    key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    save_file({**state, key: torch.ones(31)}, str(tmp_path / "shape.safetensors"))
    expect(tmp_path / "shape.safetensors", tmp_path / "shape.safetensors",
           "unet: down_blocks.0.resnets.0.norm1.weight: checkpoint has (31,), model expects (32,)")
    save_file({**state, "control_model.zero.weight": torch.ones(1)}, str(tmp_path / "extra.safetensors"))
    expect(tmp_path / "extra.safetensors", tmp_path / "extra.safetensors",
           "1 keys that are not part of Stable Diffusion (control_model.zero.weight)")
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")},
              str(tmp_path / "no_text.safetensors"))
    expect(tmp_path / "no_text.safetensors", tmp_path / "no_text.safetensors", "has no text encoder")
    expect(file, tmp_path / "no_tok", "no such file or folder", tokenizer=str(tmp_path / "no_tok"))
    expect(file, folder + "/unet", "not a CLIP tokenizer", tokenizer=folder + "/unet")


SD21_TEXT = {  # text_encoder/config.json of stable-diffusion-2-1: OpenCLIP ViT-H minus its last block
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
}
SD15_TEXT = dict(SD21_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_published_models_convert(kind):
    """v1-5-pruned / v2-1_768 key sets (built on the meta device: shapes only) -> the published
    diffusers configs and exactly the diffusers / transformers parameter names."""
    unet_config = sd15_unet_config() if kind == "sd1" else sd21_unet_config()
    text_config = SD15_TEXT if kind == "sd1" else SD21_TEXT
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**diffusers_kwargs(unet_config))
        vae = diffusers.AutoencoderKL(**diffusers_kwargs(sd15_vae_config()))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    nets = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    original = to_original(unet.state_dict(), unet_config, vae.state_dict(), sd15_vae_config(),
                           text_encoder.state_dict(), kind)
    got_kind, got_unet, got_vae, got_text = convert.configs_from_shapes(
        {k: tuple(v.shape) for k, v in original.items()})
    assert got_kind == kind
    with torch.device("meta"):
        rebuilt = {"unet": diffusers.UNet2DConditionModel(**diffusers_kwargs(got_unet)),
                   "vae": diffusers.AutoencoderKL(**diffusers_kwargs(got_vae))}
    for name, net in rebuilt.items():  # every architecture field, with diffusers' defaults filled in
        want = {k: v for k, v in nets[name].config.items() if k[0] != "_" and k != "sample_size"}
        assert {k: v for k, v in net.config.items() if k in want} == want, name
    assert {k: got_text[k] for k in text_config} == text_config

    names = {name: set() for name in nets}
    for key in original:
        for part, new_key, _ in convert.convert_key(key, got_unet, got_vae, got_text):
            names[part].add(new_key)
    for name, net in nets.items():
        assert names[name] == {k.removeprefix("text_model.") for k in net.state_dict()}, name
