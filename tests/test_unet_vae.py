"""Our UNet / VAE against diffusers' reference on tiny random models: same parameter names
(strict load of diffusers' own saved files), same outputs in float32, and the config checks.
The loader's build (meta device + assign) against a normally built network: the same bits.

Weights get random noise on top of diffusers' init so that zero/one-initialised layers (norm
affines, biases) are exercised too; inputs are non-square so an H/W mix-up cannot hide.
"""
import json

import diffusers
import pytest
import torch

from _helpers_sd import (diffusers_kwargs, relative_error, sd15_unet_config, sd15_vae_config,
                         sd21_unet_config, tiny_unet_config, tiny_vae_config)
from model.io import UserError, read_safetensors, save_safetensors
from model.sd import convert
from model.sd.layers import Conv2d
from model.sd.loader import WeightsFile, build
from model.sd.unet import UNet2DConditionModel
from model.sd.vae import AutoencoderKL

# Max |ours - diffusers| relative to max |diffusers output|, float32. Seen: <= 2.2e-6 on an Intel
# Xeon (also with AVX2-only and SSE4.2 MKL kernels) and 2.8e-6 on an AMD EPYC; a hard-coded
# norm eps gives 4e-2 (test "sd1-eps"), a wrong weight more.
RTOL = 3e-5


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models are faster on one thread (no fork/join per op), and much faster when other
    processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _saved(model, folder):
    """save_pretrained, then read back config.json and the safetensors as a user's files."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    state, _ = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    return config, state


# "sd1-eps": norm_eps far from any default, so a hard-coded eps anywhere shows up as a mismatch.
@pytest.fixture(scope="module", params=["sd1", "sd2", "sd1-eps"])
def unet_pair(request, tmp_path_factory):
    config = tiny_unet_config(request.param[:3])
    if request.param == "sd1-eps":
        config["norm_eps"] = 0.1
    ref = _perturbed(diffusers.UNet2DConditionModel(**diffusers_kwargs(config)), 0)
    config, state = _saved(ref, tmp_path_factory.mktemp(request.param))
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours, config, state


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    ref = _perturbed(diffusers.AutoencoderKL(**diffusers_kwargs(tiny_vae_config())), 1)
    config, state = _saved(ref, tmp_path_factory.mktemp("vae"))
    ours = AutoencoderKL(**config).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours, config, state


def _unet_inputs(config, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g)
    context = torch.randn(shape[0], 7, config["cross_attention_dim"], generator=g)
    return sample, context


# (2, 4, 8, 12) halves cleanly; (1, 4, 10, 6) gives odd sizes (10 -> 5 -> 3) on the way down,
# so the up path must upsample to the skip's size rather than x2.
@pytest.mark.parametrize("shape", [(2, 4, 8, 12), (1, 4, 10, 6)])
def test_unet_matches_diffusers(unet_pair, shape):
    ref, ours, config, _ = unet_pair
    sample, context = _unet_inputs(config, shape)
    timestep = torch.tensor([981, 7][:shape[0]])
    with torch.no_grad():
        expected = ref(sample, timestep, context).sample
        got = ours(sample, timestep, context)
    assert got.shape == sample.shape
    assert expected.std() > 0.3  # not a near-constant output, which any bound would pass
    assert relative_error(got, expected) <= RTOL


def test_unet_timestep_forms_agree(unet_pair):
    _, ours, config, _ = unet_pair
    sample, context = _unet_inputs(config, (2, 4, 8, 8))
    with torch.no_grad():
        by_int = ours(sample, 500, context)
        by_0d = ours(sample, torch.tensor(500), context)
        by_batch = ours(sample, torch.tensor([500, 500]), context)
        other = ours(sample, 20, context)
    assert torch.equal(by_int, by_0d) and torch.equal(by_int, by_batch)
    assert (by_int - other).abs().max() > 1e-2  # the timestep actually conditions the output


def test_vae_matches_diffusers(vae_pair):
    ref, ours, _, _ = vae_pair
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 6, 10, generator=g)
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        mean, logvar = ours.encode(images)
        expected = ref.decode(latents).sample
        decoded = ours.decode(latents)
    assert mean.shape == (2, 4, 6, 10) and decoded.shape == (2, 3, 24, 40)
    assert relative_error(mean, posterior.mean) <= RTOL
    assert relative_error(logvar, posterior.logvar) <= RTOL
    assert expected.std() > 0.3
    assert relative_error(decoded, expected) <= RTOL
    assert ours.config["scaling_factor"] == 0.18215


def _loader_built(cls, config, path):
    """`cls` built on the meta device and filled from the weights file `path` as
    model/sd/loader.py does it (load_state_dict(assign=True) of the tensors it read)."""
    with torch.device("meta"):
        module = cls(**config)
    weights = WeightsFile(str(path))
    plan = {k: (k, convert.identity) for k in weights.shapes}
    return build(module, plan, weights, cls.__name__, torch.device("cpu"), torch.float32)


def _built(cls, config, state):
    """`cls` built normally, filled by load_state_dict (a copy into its own parameters), frozen
    as the loader returns its networks: torch.matmul picks mm or bmm by whether the weight
    requires grad (our Conv2d's GEMM path goes through it), so a trainable copy of the same
    network can differ from a frozen one in the last bits."""
    module = cls(**config)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def _assert_storage_of_its_own(module):
    """Every parameter contiguous and 64-byte aligned, as torch allocates a built one."""
    for name, p in module.named_parameters():
        assert p.is_contiguous() and p.data_ptr() % 64 == 0, (name, p.stride(), p.data_ptr() % 64)


def test_meta_device_build_then_assign_load(unet_pair, vae_pair, tmp_path):
    """The loader's meta-device build gives the very bits of a normally built network. It copies
    every tensor into storage of its own: assigning a safetensors file's memory-mapped tensors
    as they are leaves them at the file's offsets (8 bytes off a 16-byte boundary), for which
    MKL's matrix-vector kernel (the batch-1 time-embedding Linear) sums in another order when it
    runs its SSE4.2 code: an AMD EPYC does, and so does this test with MKL_ENABLE_INSTRUCTIONS=SSE4_2."""
    _, _, config, state = unet_pair
    save_safetensors(tmp_path / "unet.safetensors", state)
    meta_unet = _loader_built(UNet2DConditionModel, config, tmp_path / "unet.safetensors")
    _assert_storage_of_its_own(meta_unet)
    assert not any(b.is_meta for b in meta_unet.buffers())
    unet = _built(UNet2DConditionModel, config, state)
    sample, context = _unet_inputs(config, (1, 4, 8, 8))
    with torch.no_grad():
        assert torch.equal(meta_unet(sample, 3, context), unet(sample, 3, context))

    _, _, vae_config, vae_state = vae_pair
    save_safetensors(tmp_path / "vae.safetensors", vae_state)
    meta_vae = _loader_built(AutoencoderKL, vae_config, tmp_path / "vae.safetensors")
    _assert_storage_of_its_own(meta_vae)
    vae = _built(AutoencoderKL, vae_config, vae_state)
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(meta_vae.decode(latents), vae.decode(latents))


def test_loaded_views_get_storage_of_their_own(unet_pair, tmp_path):
    """A .bin / .ckpt may hold views (torch.save keeps them): tensors at an odd offset into a
    shared storage, or with transposed strides. The loader must still give every parameter
    contiguous, aligned storage, and the network the bits of a normally built one."""
    _, _, config, state = unet_pair
    views = {}
    for key, tensor in state.items():
        if tensor.dim() == 2:
            views[key] = tensor.t().contiguous().t()  # the same values, column-major
        else:
            shared = torch.zeros(tensor.numel() + 1)
            shared[1:] = tensor.flatten()
            views[key] = shared[1:].view(tensor.shape)  # 4 bytes past an aligned address
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(views, path)
    loaded = _loader_built(UNet2DConditionModel, config, path)
    _assert_storage_of_its_own(loaded)
    unet = _built(UNet2DConditionModel, config, state)
    sample, context = _unet_inputs(config, (2, 4, 8, 12))
    with torch.no_grad():
        assert torch.equal(loaded(sample, 3, context), unet(sample, 3, context))


def test_gradient_checkpointing_gives_same_gradients(unet_pair):
    _, ours, config, state = unet_pair
    model = UNet2DConditionModel(**config)
    model.load_state_dict(state)
    sample, context = _unet_inputs(config, (1, 4, 8, 8))

    def grads():
        model.zero_grad()
        model(sample, 100, context).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) == 3  # forward once more, recomputed inside backward
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_trains_in_half_precision(unet_pair, dtype):
    """LoRA training casts the UNet to half precision: forward and checkpointed backward must run
    in that dtype (timestep embedding, attention upcast, GEMM convs) and stay close to float32."""
    _, ours, config, state = unet_pair
    model = UNet2DConditionModel(**config)
    model.load_state_dict(state)
    model.to(dtype).enable_gradient_checkpointing()
    sample, context = _unet_inputs(config, (2, 4, 8, 12))
    out = model(sample.to(dtype), 10, context.to(dtype))
    out.float().square().mean().backward()
    with torch.no_grad():
        expected = ours(sample, 10, context)
    assert out.dtype == dtype and model.conv_in.weight.grad.dtype == dtype
    assert (out.float() - expected).abs().max() / expected.abs().max() < 0.05


def _block_pairs():
    """(ours, diffusers') single blocks with equal hyper-parameters."""
    from diffusers.models.attention_processor import Attention as RefAttention
    from diffusers.models.resnet import ResnetBlock2D as RefResnet
    from model.sd.layers import ResnetBlock2D, SpatialAttention, Transformer2DModel
    for linear in (False, True):
        yield (Transformer2DModel(32, 2, 24, groups=8, use_linear_projection=linear),
               diffusers.Transformer2DModel(2, 16, in_channels=32, norm_num_groups=8,
                                            cross_attention_dim=24, use_linear_projection=linear))
    yield (ResnetBlock2D(32, 48, 64, groups=8, eps=1e-5),
           RefResnet(in_channels=32, out_channels=48, temb_channels=64, groups=8, eps=1e-5))
    yield (SpatialAttention(32, groups=8),
           RefAttention(32, heads=1, dim_head=32, norm_num_groups=8, eps=1e-6, bias=True,
                        residual_connection=True, upcast_softmax=True))


def test_blocks_match_diffusers_on_tiny_activations():
    """Inputs of std 1e-3 make variances ~1e-6, where every norm's eps changes the result, so a
    wrong eps in any block fails here even though O(1) activations would hide it."""
    for i, (ours, ref) in enumerate(_block_pairs()):
        _perturbed(ref, i)
        ours.load_state_dict(ref.state_dict(), strict=True)
        ours.eval()
        g = torch.Generator().manual_seed(i)
        x = 1e-3 * torch.randn(2, 32, 6, 10, generator=g)
        if hasattr(ours, "transformer_blocks"):
            context = torch.randn(2, 5, 24, generator=g)
            args, expected = (x, context), lambda: ref(x, context, return_dict=False)[0]
        elif hasattr(ours, "time_emb_proj"):
            temb = torch.randn(2, 64, generator=g)
            args, expected = (x, temb), lambda: ref(x, temb)
        else:
            args, expected = (x,), lambda: ref(x)
        with torch.no_grad():
            torch.testing.assert_close(ours(*args), expected(), rtol=1e-4, atol=1e-6,
                                       msg=type(ours).__name__)


@pytest.mark.parametrize("kernel, size", [(3, (8, 6)), (1, (5, 7)), (3, (12, 10))])
def test_conv2d_gemm_path_matches_torch_conv(kernel, size):
    """Small maps take our unfold+GEMM path, larger ones torch's; both must equal nn.Conv2d."""
    torch.manual_seed(0)
    ours = Conv2d(24, 40, kernel, padding=kernel // 2)
    ref = torch.nn.Conv2d(24, 40, kernel, padding=kernel // 2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 24, *size)
    assert (size[0] * size[1] <= Conv2d.GEMM_MAX_PIXELS) == (size != (12, 10))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_full_size_layouts_match_diffusers_on_meta():
    """The published SD1.5 / SD2.1 / SD VAE configs build the same parameter names and shapes as
    diffusers does; on the meta device, so no memory is allocated."""
    cases = [(UNet2DConditionModel, diffusers.UNet2DConditionModel, sd15_unet_config()),
             (UNet2DConditionModel, diffusers.UNet2DConditionModel, sd21_unet_config()),
             (AutoencoderKL, diffusers.AutoencoderKL, sd15_vae_config())]
    for ours_cls, ref_cls, config in cases:
        with torch.device("meta"):
            ours = ours_cls(**config)
            ref = ref_cls(**diffusers_kwargs(config))
        assert ({k: v.shape for k, v in ours.state_dict().items()}
                == {k: v.shape for k, v in ref.state_dict().items()})


@pytest.mark.parametrize("cls, config, key, value", [
    (UNet2DConditionModel, tiny_unet_config("sd1"), "addition_embed_type", "text_time"),  # SDXL
    (UNet2DConditionModel, tiny_unet_config("sd1"), "class_embed_type", "timestep"),
    (UNet2DConditionModel, tiny_unet_config("sd1"), "transformer_layers_per_block", 2),
    (UNet2DConditionModel, tiny_unet_config("sd1"), "mid_block_type", "UNetMidBlock2D"),
    (UNet2DConditionModel, tiny_unet_config("sd1"), "some_future_key", 1),
    (UNet2DConditionModel, tiny_unet_config("sd1"), "down_block_types",
     ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    (AutoencoderKL, tiny_vae_config(), "shift_factor", 0.1159),  # SD3 VAE
    (AutoencoderKL, tiny_vae_config(), "use_quant_conv", False),
])
def test_unsupported_config_raises_user_error(cls, config, key, value):
    with pytest.raises(UserError) as err, torch.device("meta"):
        cls(**{**config, key: value})
    message = str(err.value)
    assert (key in message or "SimpleCrossAttnDownBlock2D" in message) and "\n" not in message


def test_config_keeps_given_and_default_keys():
    config = tiny_unet_config("sd2")
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    assert {k: model.config[k] for k in config} == config
    assert model.config["transformer_layers_per_block"] == 1  # a default filled in
