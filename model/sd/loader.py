"""Load Stable Diffusion 1.x / 2.x: a diffusers folder, an original single file, or a hub id.

    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # hub id (cached)
    pipe = load_pipeline("runs/sd15")                                    # diffusers folder
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors", tokenizer="openai/clip-vit-large-patch14")

The UNet and VAE are ours (model/sd/unet.py, model/sd/vae.py, diffusers' parameter names), the
text encoder and tokenizer are transformers' CLIPTextModel / CLIPTokenizer, the scheduler our DDIM.

Memory: every network is built on the meta device (no storage), then filled with
`load_state_dict(assign=True)` from tensors read one at a time and cast as read, so a full
SD1.5 (4.3 GB in float32) never exists twice, and float16 / bfloat16 load straight into that
dtype. Every parameter is contiguous in storage allocated for it, never a view into the file, so
a loaded network computes bit for bit what the same network built, filled by `load_state_dict`
and frozen computes (see `_materialised`). `.bin` / `.ckpt` / `.pt` files are read with
`torch.load(weights_only=True)`: a file that needs full pickle (which can run arbitrary code) is
refused.
"""
import dataclasses
import os
import re

import torch

from model.sd import convert
from model.io import UserError, first_line, load_torch, read_json
from model.sd.ddim import DDIMScheduler
from model.sd.unet import UNet2DConditionModel
from model.sd.vae import AutoencoderKL

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "text_encoder": ("model.safetensors", "pytorch_model.bin")}
# What a hub download fetches: the float32 safetensors and the small files, nothing else
# (SD1.5's repo also holds .bin, fp16, non-EMA and .ckpt copies: ~40 GB in all).
HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
TOKENIZER_FILES = ["tokenizer/*", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json"]
TOKENIZER_HINT = ("pass --tokenizer PATH_OR_HUB_ID (e.g. openai/clip-vit-large-patch14 for "
                  "SD1.x, stabilityai/stable-diffusion-2-1 for SD2.x, or a diffusers SD folder)")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# diffusers before 0.15 named the VAE's attention projections differently; SD1.5's hub files
# still use those names.
OLD_VAE_ATTENTION = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                     (".proj_attn.", ".to_out.0.")]


@dataclasses.dataclass
class Pipeline:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: object    # transformers.CLIPTextModel (imported lazily: slow import)
    tokenizer: object       # transformers.CLIPTokenizer, or a MissingTokenizer
    scheduler: DDIMScheduler
    vae_scale: float        # latents = vae_scale * vae mean (LDM paper sec. 4.3: unit variance)
    prediction_type: str    # "epsilon" | "v_prediction" | "sample"
    kind: str               # "sd1" (CLIP ViT-L text encoder) | "sd2" (OpenCLIP ViT-H)


class MissingTokenizer:
    """Stands in for the tokenizer a single-file checkpoint does not contain: loading (e.g. to
    convert, or to sample from saved prompt embeddings) works; encoding a prompt is a UserError."""

    def __init__(self, source):
        self.message = f"{source} holds no tokenizer: {TOKENIZER_HINT}"

    def __call__(self, *args, **kwargs):
        raise UserError(self.message)

    def __getattr__(self, name):
        if name.startswith("__"):  # keep copy/pickle/introspection protocols working
            raise AttributeError(name)
        raise UserError(self.message)


def load_pipeline(source, device="cpu", dtype=torch.float32, tokenizer=None, prediction_type=None):
    """Load every part of a Stable Diffusion 1.x/2.x model; see the module docstring.

    source: diffusers folder | .safetensors/.ckpt/.pt single file | Hugging Face hub id.
    tokenizer: path or hub id overriding the source's tokenizer (needed for a single file).
    prediction_type: overrides the scheduler's; a single file cannot tell, so it defaults to
    "epsilon" there: pass "v_prediction" for SD2.x 768-px models (v2-1_768-ema-pruned etc.).
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = locate(source, HUB_FILES)
    given = load_tokenizer(tokenizer) if tokenizer is not None else None  # fail before the slow part
    if os.path.isdir(path):
        parts = _load_folder(path, device, dtype, tokenizer=given is None)
    else:
        parts = _load_single_file(path, device, dtype)
    if given is not None:
        parts["tokenizer"] = given
    scheduler_config = dict(parts.pop("scheduler_config"))
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    # Clipping x0 to [-1, 1] is meant for pixel-space models; latents are not bounded, and
    # diffusers' StableDiffusionPipeline forces it off too, whatever the config says.
    scheduler_config["clip_sample"] = False
    scheduler = DDIMScheduler(**scheduler_config)
    return Pipeline(**parts, scheduler=scheduler, prediction_type=scheduler.prediction_type)


def model_defaults(source):
    """What a local diffusers folder says about how to sample it, read from its config files alone
    (nothing is loaded): "resolution", the UNet's sample_size times the VAE factor, as diffusers'
    pipelines default their height and width; and from a medsynth pretrain.json beside them, the
    data's own "image_size" and the recorded "sample_steps" and "guidance". {} for anything else
    (a single file or a hub id: the caller's defaults apply)."""
    source = os.fspath(source)
    unet = os.path.join(source, "unet", "config.json")
    vae = os.path.join(source, "vae", "config.json")
    if not (os.path.isfile(unet) and os.path.isfile(vae)):
        return {}
    factor = 2 ** (len(read_json(vae).get("block_out_channels", [0] * 4)) - 1)
    out = {"resolution": int(read_json(unet)["sample_size"]) * factor}
    card = read_json(os.path.join(source, "pretrain.json"), missing_ok=True) or {}
    out.update({k: card[k] for k in ("image_size", "sample_steps", "guidance") if k in card})
    return out


def load_tokenizer(source):
    """CLIPTokenizer from a folder with vocab.json + merges.txt (older transformers) or
    tokenizer.json (transformers >= 5 saves only that), an SD folder with tokenizer/, or a hub id
    holding either."""
    from transformers import CLIPTokenizer
    folder = locate(source, TOKENIZER_FILES)
    if os.path.isdir(os.path.join(folder, "tokenizer")):
        folder = os.path.join(folder, "tokenizer")
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if not ("tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files):
        raise UserError(f"{folder}: not a CLIP tokenizer (expected a folder with vocab.json and "
                        "merges.txt or tokenizer.json, or a diffusers SD folder with tokenizer/)")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{folder}: cannot load the CLIP tokenizer ({first_line(e)})") from None


def locate(source, hub_files):
    """A local path as is; a hub id ("org/name") -> its snapshot folder in the HF cache,
    downloaded if needed (only `hub_files`), from the cache alone when offline."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if not HUB_ID.fullmatch(source) or source.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        raise UserError(f"{source}: no such file or folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        return snapshot_download(source, allow_patterns=hub_files,
                                 local_files_only=constants.HF_HUB_OFFLINE)
    except RepositoryNotFoundError:
        raise UserError(f"{source}: not a local path, and no such model on the Hugging Face hub "
                        "(or it is gated/private: accept its licence and log in)") from None
    except Exception as e:
        raise UserError(f"{source}: not a local path, and as a Hugging Face hub id it is not in "
                        f"the local cache and cannot be downloaded ({type(e).__name__}): run once "
                        "with network access, or pass a local folder or file path") from None


class WeightsFile:
    """The tensors of one weights file, read on demand: `shapes` up front, `get(key)` one tensor.

    .safetensors: only the header is parsed here. `get` returns a view into the memory-mapped
    file, which the caller copies out; the file is re-mapped every MAP_BYTES so that the touched
    pages of old mappings are released (one mapping for the whole 4 GB file would keep every page
    resident next to the copies: twice the weights at peak).
    .bin/.ckpt/.pt: `torch.load(weights_only=True)` (a Lightning .ckpt's `state_dict` is used).
    """

    MAP_BYTES = 64 * 2**20

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"{path}: file not found")
        self.mapped = path.endswith(".safetensors")
        if self.mapped:
            self._file, self._bytes = self._open(), 0
            self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        elif path.endswith((".ckpt", ".pt", ".pth", ".bin")):
            obj = load_torch(path)
            state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
            if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
                raise UserError(f"{path}: expected a state dict of tensors, "
                                f"found {type(state).__name__}")
            self._tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise UserError(f"{path}: unknown weights format (expected .safetensors, "
                            "or .ckpt/.pt/.bin holding only tensors)")

    def _open(self):
        from safetensors import safe_open
        try:
            return safe_open(self.path, framework="pt")
        except Exception as e:
            raise UserError(f"{self.path}: not a valid .safetensors file ({first_line(e)})") from None

    def get(self, key):
        if not self.mapped:
            return self._tensors[key]
        if self._file is None or self._bytes > self.MAP_BYTES:
            # dropping the handle unmaps the old mapping once the caller's last view of it is gone
            self._file, self._bytes = None, 0
            self._file = self._open()
        try:
            tensor = self._file.get_tensor(key)
        except Exception as e:
            raise UserError(f"{self.path}: cannot read tensor {key} ({first_line(e)})") from None
        self._bytes += tensor.numel() * tensor.element_size()
        return tensor

    def close(self):
        if self.mapped:
            self._file = None


def build(module, plan, weights, name, device, dtype):
    """Fill `module`, built on the meta device, from `plan` = {module key: (file key, transform)}.

    Strict: every parameter must come from the file with its exact shape. Floating tensors are
    cast to `dtype` as they are read. Keys are compared without a leading `text_model.`:
    transformers >= 5.6 dropped that prefix from CLIPTextModel, released checkpoints have it.
    """
    where = f"{weights.path}: {name}"
    expected = module.state_dict()  # meta tensors: names and shapes, no memory
    by_name = {k.removeprefix("text_model."): k for k in expected}
    plan = {k.removeprefix("text_model."): v for k, v in plan.items()}
    missing = [k for k in by_name if k not in plan]
    unexpected = [k for k in plan if k not in by_name]
    if missing or unexpected:
        raise UserError(f"{where}: " + "; ".join(
            f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    state = {}
    for key, (file_key, transform) in plan.items():
        tensor, want = weights.get(file_key), expected[by_name[key]]
        try:
            tensor = transform(tensor)
        except RuntimeError:  # e.g. a 3x3 kernel where a 1x1 one is reshaped: report it as is
            pass
        if tensor.shape != want.shape:
            raise UserError(f"{where}: {key}: checkpoint has {tuple(tensor.shape)}, "
                            f"model expects {tuple(want.shape)}")
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        state[by_name[key]] = _materialised(tensor, device, cast, from_map=weights.mapped)
    weights.close()
    module.load_state_dict(state, strict=True, assign=True)
    _fill_meta_buffers(module, device)
    return module.eval().requires_grad_(False)


ALIGN_BYTES = 64  # what torch's CPU allocator gives every allocation


def _materialised(tensor, device, dtype, from_map):
    """`tensor` on `device` in `dtype`, contiguous, in storage allocated for it (so 64-byte
    aligned), as the parameters of a network built and filled by `load_state_dict` are.

    Not only for memory: a view into a memory-mapped file (`from_map`: copied out so the mapping
    can be released) sits at its offset in the file, often 8 bytes off a 16-byte boundary, and a
    transform's view (a slice of fused q/k/v, a reshape) has its own offset and strides. Kernels
    may take another path, and round differently, for such a weight: MKL's matrix-vector product
    (a batch-1 Linear) does when it runs its SSE4.2 code, as it may on non-Intel CPUs, so the same
    weights gave other last bits. A tensor already contiguous, aligned, in `dtype` and on `device`
    (torch.load gives each stored tensor its own storage) is kept: no second copy."""
    if (not from_map and tensor.device == device and tensor.dtype == dtype and tensor.is_contiguous()
            and tensor.data_ptr() % ALIGN_BYTES == 0):
        return tensor
    return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)


def _fill_meta_buffers(module, device):
    """Non-persistent buffers are in no checkpoint, so the meta device left them empty. The only
    one in these networks is CLIP's position_ids, (1, 77) = 0..76."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} is not in the checkpoint and cannot be rebuilt")
        owner, leaf = module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                              persistent=False)


def _new(cls, config, where):
    """Our UNet / VAE from a diffusers config dict, on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            return cls(**config)  # resolve_config ignores `_class_name` etc.
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _new_text_encoder(config):
    """transformers CLIPTextModel on the meta device; config: a dict of CLIPTextConfig fields,
    or the text_encoder/ folder holding config.json."""
    from transformers import CLIPTextConfig, CLIPTextModel
    if isinstance(config, dict):
        config = CLIPTextConfig(**config)
    else:
        read_json(os.path.join(config, "config.json"))  # a one-line error if missing or broken
        try:
            config = CLIPTextConfig.from_pretrained(config)
        except Exception as e:
            raise UserError(f"{config}: not a CLIP text encoder config ({first_line(e)})") from None
    with torch.device("meta"):
        return CLIPTextModel(config)


def _load_folder(folder, device, dtype, tokenizer=True):
    """A diffusers StableDiffusionPipeline folder (save_pretrained, or a hub snapshot)."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise UserError(f"{folder}: not a diffusers Stable Diffusion folder (expected "
                        "model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    for name in ("unet", "vae", "text_encoder", "scheduler") + (("tokenizer",) if tokenizer else ()):
        if not os.path.isdir(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)}: folder not found "
                            f"(a diffusers SD folder has {name}/)")
    parts = dict(tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")) if tokenizer else None,
                 scheduler_config=read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
    configs = {name: os.path.join(folder, name, "config.json") for name in ("unet", "vae")}
    unet_config, vae_config = (read_json(path) for path in configs.values())
    modules = {"unet": lambda: _new(UNet2DConditionModel, unet_config, configs["unet"]),
               "vae": lambda: _new(AutoencoderKL, vae_config, configs["vae"]),
               "text_encoder": lambda: _new_text_encoder(os.path.join(folder, "text_encoder"))}
    for name, make in modules.items():
        weights = _weights_in(os.path.join(folder, name))
        plan = {k: (k, convert.identity) for k in weights.shapes if not k.endswith("position_ids")}
        if name == "vae":
            plan = {_replace_all(k, OLD_VAE_ATTENTION): v for k, v in plan.items()}
        parts[name] = build(make(), plan, weights, name, device, dtype)
    scale = vae_config.get("scaling_factor", convert.SD_VAE["scaling_factor"])
    return dict(parts, vae_scale=float(scale), kind=_kind(unet_config))


def _weights_in(folder):
    names = WEIGHTS[os.path.basename(folder)]
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return WeightsFile(os.path.join(folder, name))
    raise UserError(f"{folder}: no weights (expected {' or '.join(names)})")


def _replace_all(key, rules):
    """Every occurrence of each `old` in `key` replaced by its `new`, rule by rule."""
    for old, new in rules:
        key = key.replace(old, new)
    return key


def _load_single_file(path, device, dtype):
    """An original (CompVis / Stability) checkpoint holding UNet, VAE and text encoder."""
    weights = WeightsFile(path)
    try:
        kind, unet_config, vae_config, text_config = convert.configs_from_shapes(weights.shapes)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    plans = {"unet": {}, "vae": {}, "text_encoder": {}, "file": {}}
    for key in weights.shapes:
        for part, new_key, transform in convert.convert_key(key, unet_config, vae_config, text_config):
            plans[part][new_key] = (key, transform)
    if plans["file"]:
        keys = list(plans["file"])
        raise UserError(f"{path}: {len(keys)} keys that are not part of Stable Diffusion "
                        f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    modules = {"unet": _new(UNet2DConditionModel, unet_config, path),
               "vae": _new(AutoencoderKL, vae_config, path),
               "text_encoder": _new_text_encoder(text_config)}
    parts = {name: build(module, plans[name], weights, name, device, dtype)
             for name, module in modules.items()}
    return dict(parts, tokenizer=MissingTokenizer(path), scheduler_config=convert.SD_SCHEDULER,
                vae_scale=vae_config["scaling_factor"], kind=kind)


def _kind(unet_config):
    # SD2.x swapped CLIP ViT-L (768) for OpenCLIP ViT-H (1024) and linear transformer projections
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"
