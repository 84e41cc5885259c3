"""DDIMScheduler: parity with diffusers' DDIMScheduler, plus properties that hold by construction
of DDIM (an oracle noise prediction walks exactly along the forward process)."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler as RefDDIM  # noqa: E402

from model.sd.ddim import DDIMScheduler  # noqa: E402
from model.io import UserError  # noqa: E402

# stable-diffusion-v1-5/scheduler/scheduler_config.json as published: a PNDM config.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# SD2.x-style DDIM with the fixes of Lin et al. 2023: trailing spacing, zero terminal SNR, v-pred.
ZERO_SNR_V = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", timestep_spacing="trailing",
                  rescale_betas_zero_snr=True, prediction_type="v_prediction")
CONFIGS = {
    "sd15": SD15_SCHEDULER,
    "trailing_zero_snr_v": ZERO_SNR_V,
    "linear_clip_sample": {"beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 1.5,
                           "prediction_type": "sample", "set_alpha_to_one": True},
}


def both(cfg):
    ref_cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "skip_prk_steps"}
    return DDIMScheduler(**cfg), RefDDIM(**ref_cfg)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_for_every_step_count(spacing):
    for n in list(range(1, 60)) + [100, 250, 999]:
        cfg = dict(SD15_SCHEDULER, timestep_spacing=spacing)
        ours, ref = both(cfg)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), (spacing, n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_alphas_cumprod_match_diffusers(name):
    ours, ref = both(CONFIGS[name])
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7, rtol=0)
    if CONFIGS[name].get("rescale_betas_zero_snr"):
        assert ours.alphas_cumprod[-1] == 0  # zero terminal SNR: pure noise at t = T-1


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_step_matches_diffusers(name, eta):
    """Run a whole 20-step chain with a fake model (a fixed function of x and t); at every step
    both schedulers get the same input and noise, and prev and pred-x0 must agree."""
    ours, ref = both(CONFIGS[name])
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g) * 0.3
    for i, t in enumerate(ours.timesteps):
        model_output = torch.einsum("oc,bchw->bohw", weight, x) * (1 + t / 1000) + torch.sin(x)
        noise = torch.randn(x.shape, generator=g)
        prev, x0 = ours.step(model_output, t, x, eta=eta, noise=noise)
        out = ref.step(model_output, t, x, eta=eta, variance_noise=noise if eta else None)
        assert (x0 - out.pred_original_sample).abs().max() <= 1e-6, int(t)
        assert torch.isfinite(prev).all()
        if torch.isfinite(out.prev_sample).all():
            assert (prev - out.prev_sample).abs().max() <= 1e-6, int(t)
        else:
            # diffusers takes sqrt of a rounding-negative 1 - a_prev - sigma^2 at alpha_t = 0
            # (zero SNR, eta=1): the exact value of that coefficient is 0.
            assert name == "trailing_zero_snr_v" and eta == 1.0 and i == 0
            a_prev = ours.alphas_cumprod[ours.timesteps[1]]
            assert torch.allclose(prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise, atol=1e-3)
        x = prev


def test_eta_noise_from_generator_is_reproducible_and_eta_changes_the_result():
    s = DDIMScheduler(**SD15_SCHEDULER)
    s.set_timesteps(10)
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = s.timesteps[3]
    a, _ = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    b, _ = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    c, _ = s.step(out, t, x, eta=0.0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("spacing,n", [("leading", 20), ("trailing", 3), ("trailing", 7), ("linspace", 6)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_model_stays_on_the_forward_process(spacing, n, prediction_type):
    """If the model predicts the true noise of x_t = add_noise(x0, eps, t), deterministic DDIM
    (eq. 12, eta=0) must land exactly on add_noise(x0, eps, t_prev) for the next scheduled t_prev
    and on x0 after the last step. This also holds for spacings whose steps are uneven (trailing
    with 3 or 7 steps, linspace), where diffusers' `t - T//n` rule would not."""
    cfg = dict(SD15_SCHEDULER, timestep_spacing=spacing, prediction_type=prediction_type,
               set_alpha_to_one=True)
    s = DDIMScheduler(**cfg)
    s.set_timesteps(n)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    ts = s.timesteps.tolist()
    x = s.add_noise(x0, eps, torch.tensor([ts[0]] * 2))
    for i, t in enumerate(ts):
        tb = torch.tensor([t] * 2)
        target = {"epsilon": eps, "sample": x0, "v_prediction": s.get_velocity(x0, eps, tb)}[prediction_type]
        x, pred_x0 = s.step(target, t, x)
        assert torch.allclose(pred_x0, x0, atol=1e-9)
        expected = s.add_noise(x0, eps, torch.tensor([ts[i + 1]] * 2)) if i + 1 < len(ts) else x0
        assert torch.allclose(x, expected, atol=1e-9), (i, t)


def test_add_noise_and_velocity_match_diffusers():
    ours, ref = both(ZERO_SNR_V)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6)
    # at zero terminal SNR, x_{T-1} is pure noise and v = -x0
    assert torch.equal(ours.add_noise(x0, noise, t)[4], noise[4])
    assert torch.allclose(ours.get_velocity(x0, noise, t)[4], -x0[4])


def test_bad_config_and_calls_are_reported():
    with pytest.raises(UserError, match="prediction_type"):
        DDIMScheduler(prediction_type="flow")
    with pytest.raises(UserError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    s = DDIMScheduler(**SD15_SCHEDULER)
    with pytest.raises(UserError, match="1..1000"):
        s.set_timesteps(0)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(torch.zeros(1), 500, torch.zeros(1))
