"""model/lora/: injection is exact, merge/unmerge, both file formats, diffusers/PEFT parity.

References are independent implementations: diffusers' `load_lora_weights` (which builds PEFT
layers from our files) and PEFT itself, on tiny random models built by diffusers."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel as DiffusersUNet)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from _helpers_sd import (diffusers_kwargs, sd15_unet_config, tiny_clip_config,  # noqa: E402
                         tiny_unet_config, tiny_vae_config)
from model.lora import files as LF, layers as L  # noqa: E402
from model.sd.loader import load_pipeline  # noqa: E402
from model.io import UserError  # noqa: E402
from model.sd.tiny import make_tiny_tokenizer  # noqa: E402
from model.sd.unet import UNet2DConditionModel  # noqa: E402

ALL_UNET = L.TARGETS["unet_attn"] + L.TARGETS["unet_ff"] + L.TARGETS["unet_proj"]
ALL_TEXT = L.TARGETS["text_attn"] + L.TARGETS["text_mlp"]


def models(kind, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**diffusers_kwargs(tiny_unet_config(kind))).eval()
    text = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(kind))).eval()
    return unet, text


def inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    dim = tiny_clip_config(kind)["hidden_size"]
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, dim, generator=g), torch.randint(0, 500, (2, 77), generator=g))


@torch.no_grad()
def run(unet, text, x):
    """UNet output on given text states and the text encoder's output on token ids."""
    sample, t, ctx, ids = x
    return unet(sample, t, ctx), text(ids)[0]


def add_random_lora(unet, text, rank=4, alpha=8.0, seed=0):
    """Inject on every target group and give B non-zero values (trained LoRAs are not zero)."""
    g = torch.Generator().manual_seed(seed)
    L.inject_lora(unet, ALL_UNET, rank, alpha, generator=g)
    L.inject_lora(text, ALL_TEXT, rank, alpha, generator=g)
    with torch.no_grad():
        for p in L.lora_parameters(unet) + L.lora_parameters(text):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_untrained_lora_leaves_outputs_bit_identical(kind):
    unet, text = models(kind)
    x = inputs(kind)
    before = run(unet, text, x)
    names = L.inject_lora(unet, ALL_UNET, 4, 4.0) + L.inject_lora(text, ALL_TEXT, 4, 4.0)
    after = run(unet, text, x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # every attention has q, k, v, out; every transformer block ff in/out; proj_in/out per transformer
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2")))
    n_tf = sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    n_layers = tiny_clip_config(kind)["num_hidden_layers"]
    assert len(names) == 4 * n_attn + 2 * n_tf + 2 * n_tf + 6 * n_layers
    # proj_in/out are 1x1 convs in SD1 and linears in SD2: both wrapped
    conv = {n for n, m in L.lora_layers(unet) if m.conv}
    assert (len(conv) == 2 * n_tf) if kind == "sd1" else not conv


def test_lora_output_is_eq3_and_merge_unmerge_restores():
    unet, text = models("sd1")
    x = inputs("sd1")
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    add_random_lora(unet, text, rank=4, alpha=8.0)
    # one layer against LoRA eq. 3 written out by hand: W x + b + alpha/r * B A x
    layer = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    h = torch.randn(3, layer.base.in_features)
    want = h @ layer.base.weight.T + (8.0 / 4) * (h @ layer.lora_down.T) @ layer.lora_up.T
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-6)

    unmerged = run(unet, text, x)
    L.merge_lora(unet)
    L.merge_lora(text)
    merged = run(unet, text, x)
    for a, b in zip(unmerged, merged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 rounding of W + BA
    L.unmerge_lora(unet)
    L.unmerge_lora(text)
    restored = {k.replace(".base.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert restored.keys() == base_weights.keys()
    for k, v in base_weights.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6)
    for a, b in zip(unmerged, run(unet, text, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", LF.FORMATS)
def test_saved_lora_reloads_to_identical_outputs(tmp_path, fmt):
    unet, text = models("sd1")
    add_random_lora(unet, text, alpha=6.0)
    odd = unet.get_submodule("mid_block.attentions.0.proj_in")  # a 1x1 conv with its own alpha
    odd.alpha, odd.scale = 1.0, 1.0 / 4
    want = run(unet, text, inputs("sd1"))
    path = tmp_path / "lora.safetensors"
    LF.save_lora(path, L.lora_state(unet, text), fmt, {"classes": ["a", "b"], "steps": 7})
    state, meta = LF.load_lora(path)
    assert meta == {"classes": ["a", "b"], "steps": 7}
    fresh_unet, fresh_text = models("sd1")
    applied = L.inject_lora_weights(fresh_unet, fresh_text, state)
    assert sorted(applied["unet"]) == sorted(n for n, _ in L.lora_layers(unet))
    got = run(fresh_unet, fresh_text, inputs("sd1"))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_kohya_file_layout_and_round_trip(tmp_path):
    unet, text = models("sd1")
    add_random_lora(unet, text, rank=3, alpha=5.0)
    first = tmp_path / "a.safetensors"
    LF.save_lora(first, L.lora_state(unet, text), "kohya")
    tensors = load_file(first)
    key = re.compile(r"lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert all(key.fullmatch(k) for k in tensors), [k for k in tensors if not key.fullmatch(k)][:3]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in tensors
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {5.0}
    # kohya -> canonical -> kohya gives the same file contents
    second = tmp_path / "b.safetensors"
    LF.save_lora(second, LF.load_lora(first)[0], "kohya")
    again = load_file(second)
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """kind -> a tiny random SD pipeline built and saved by diffusers (our load_pipeline reads it)."""
    folders = {}

    def get(kind):
        if kind not in folders:
            folders[kind] = _save_diffusers_pipeline(kind, str(tmp_path_factory.mktemp(f"sd-{kind}")))
        return folders[kind]
    return get


def _save_diffusers_pipeline(kind, folder):
    torch.manual_seed(0)
    make_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    StableDiffusionPipeline(
        unet=DiffusersUNet(**diffusers_kwargs(tiny_unet_config(kind))),
        vae=AutoencoderKL(**diffusers_kwargs(tiny_vae_config())),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny_clip_config(kind))),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind,fmt", [("sd1", "kohya"), ("sd1", "diffusers"), ("sd2", "kohya"), ("sd2", "diffusers")])
def test_diffusers_load_lora_weights_matches_our_lora(tmp_path, diffusers_folder, kind, fmt):
    folder = diffusers_folder(kind)
    ours = load_pipeline(folder)
    add_random_lora(ours.unet, ours.text_encoder, rank=4, alpha=2.0)  # alpha != rank: scale must travel
    if fmt == "diffusers":  # one module with its own alpha (PEFT's alpha_pattern). Not for kohya:
        # diffusers' kohya converter drops per-module alphas that differ (their key mapping bug).
        odd = ours.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
        odd.alpha, odd.scale = 6.0, 6.0 / 4
    path = str(tmp_path / "lora.safetensors")
    LF.save_lora(path, L.lora_state(ours.unet, ours.text_encoder), fmt)

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    sample, t, ctx, ids = inputs(kind)
    with torch.no_grad():
        base = ref.unet(sample, t, ctx).sample
        ref.load_lora_weights(path)
        want = ref.unet(sample, t, ctx).sample
        want_text = ref.text_encoder(ids)[0]
    got, got_text = run(ours.unet, ours.text_encoder, (sample, t, ctx, ids))
    assert (want - base).abs().max() > 1e-2  # the LoRA really changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=1e-5)


def test_peft_style_keys_load(tmp_path):
    """A bare PEFT state dict (lora_A / lora_B, no prefix, alpha = rank) from PEFT's own injection."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    torch.manual_seed(0)
    ref = DiffusersUNet(**diffusers_kwargs(tiny_unet_config("sd1"))).eval()
    ours = UNet2DConditionModel(**diffusers_kwargs(tiny_unet_config("sd1"))).eval()
    ours.load_state_dict(ref.state_dict())
    ref = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=list(ALL_UNET)), ref)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    path = str(tmp_path / "peft.safetensors")
    save_file(get_peft_model_state_dict(ref), path)
    L.inject_lora_weights(ours, None, LF.load_lora(path)[0])
    sample, t, ctx, _ = inputs("sd1")
    with torch.no_grad():
        torch.testing.assert_close(ours(sample, t, ctx), ref(sample, t, ctx).sample, rtol=0, atol=1e-5)


def test_lora_for_another_model_is_a_one_line_error(tmp_path):
    unet1, text1 = models("sd1")
    unet2, text2 = models("sd2")  # wider cross-attention (48 vs 32): to_k / to_v do not fit
    L.inject_lora(unet2, L.TARGETS["unet_attn"], 4, 4.0)
    path = tmp_path / "sd2.safetensors"
    LF.save_lora(path, L.lora_state(unet2), "kohya")
    before = {k: v.clone() for k, v in unet1.state_dict().items()}
    with pytest.raises(UserError) as e:
        L.inject_lora_weights(unet1, text1, LF.load_lora(path)[0])
    msg = str(e.value)
    assert "\n" not in msg and "attn2.to_k" in msg and "(4, 48)" in msg and "(32, 32)" in msg
    assert not L.lora_layers(unet1)  # checked before touching the model
    assert all(torch.equal(v, unet1.state_dict()[k]) for k, v in before.items())

    state = {"unet.down_blocks.9.attentions.0.to_q.lora_down.weight": torch.zeros(1, 4),
             "unet.down_blocks.9.attentions.0.to_q.lora_up.weight": torch.zeros(4, 1)}
    with pytest.raises(UserError, match="does not exist in the base model"):
        L.inject_lora_weights(unet1, None, state)
    with pytest.raises(UserError, match="no text_encoder"):
        L.inject_lora_weights(unet1, None, {"text_encoder.x.lora_down.weight": torch.zeros(1, 2),
                                   "text_encoder.x.lora_up.weight": torch.zeros(2, 1)})


def test_diffusers_header_carries_rank_and_alpha(tmp_path):
    unet, text = models("sd1")
    L.inject_lora(unet, L.TARGETS["unet_attn"], 8, 16.0)
    path = tmp_path / "l.safetensors"
    LF.save_lora(path, L.lora_state(unet), "diffusers", {"rank": 8})
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()[LF.DIFFUSERS_META_KEY])
    assert header["unet.r"] == 8 and header["unet.lora_alpha"] == 16.0
    assert len(header["unet.target_modules"]) == len(L.lora_layers(unet))


@pytest.mark.parametrize("rank", [4, 16])
def test_parameter_count_matches_peft_on_sd15(rank):
    """Built on the meta device (no memory): SD1.5's UNet with the default attention targets."""
    from peft import LoraConfig, inject_adapter_in_model
    with torch.device("meta"):
        ours = UNet2DConditionModel(**diffusers_kwargs(sd15_unet_config()))
        ref = DiffusersUNet(**diffusers_kwargs(sd15_unet_config()))
    L.inject_lora(ours, L.TARGETS["unet_attn"], rank, rank)
    ref = inject_adapter_in_model(LoraConfig(r=rank, target_modules=list(L.TARGETS["unet_attn"])), ref)
    n_ours = sum(p.numel() for p in L.lora_parameters(ours))
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)
    assert n_ours == n_ref
    print(f"SD1.5 UNet attention LoRA rank {rank}: {n_ours:,} parameters")


def test_older_diffusers_key_layouts_load(tmp_path):
    """`<module>.lora.down/up` (diffusers 0.2x) and attention-processor names (`attn1.processor.
    to_q_lora.down`, diffusers <= 0.20) name the same modules as today's lora_A / lora_B."""
    unet, text = models("sd1")
    add_random_lora(unet, text)
    want = LF.load_lora(_saved(tmp_path / "new.safetensors", L.lora_state(unet)))[0]
    old = {}
    for key, t in want.items():
        if key.endswith(".alpha"):
            continue
        mod, part, _ = key.rsplit(".", 2)  # "unet.<module>", "lora_down" | "lora_up", "weight"
        part = part.removeprefix("lora_")
        attn = re.fullmatch(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", mod)
        if attn:
            old[f"{attn[1]}.processor.{attn[2]}_lora.{part}.weight"] = t
        else:
            old[f"{mod}.lora.{part}.weight"] = t
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    got = LF.load_lora(path)[0]
    assert got.keys() == want.keys()
    # old files carry no alpha: diffusers' convention alpha = rank
    assert all(float(got[k]) == 4.0 for k in got if k.endswith(".alpha"))
    assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith(".alpha"))


def _saved(path, state):
    LF.save_lora(path, state, "diffusers")
    return path
