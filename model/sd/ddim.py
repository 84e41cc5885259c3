"""DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models") + the forward process.

One class serves both sides of Stable Diffusion: training uses `add_noise` / `get_velocity`
(the targets), sampling uses `set_timesteps` + `step`. It is built from a diffusers
`scheduler_config.json` dict. Only the beta schedule and the sampling options are read, so the
PNDM config that SD1.5 ships also yields a DDIM with the same noise schedule (other keys such as
`_class_name` or `skip_prk_steps` are ignored).

Notation: alphas_cumprod[t] = prod_{s<=t} (1 - beta_s) is the DDIM paper's alpha_t
(the DDPM paper's alpha-bar_t); x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps.
"""
import numpy as np
import torch

from model.io import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(alpha_t) so that it is 0 at t = T-1 and unchanged at t = 0.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    with SD's schedule the last step still holds ~0.07 of the signal, so a model never learns to
    start from pure noise. Zero terminal SNR requires v-prediction (eps is undefined at alpha=0).
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
    return 1.0 - alphas


class DDIMScheduler:
    """DDIMScheduler(**scheduler_config_json). Sampling: set_timesteps(n), then for t in
    .timesteps: x, x0 = step(model_output, t, x, eta). Training: add_noise / get_velocity.
    Keys of the config that do not concern DDIM (`_class_name`, PNDM's `skip_prk_steps`, ...)
    are accepted and ignored."""

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                 beta_schedule="linear", trained_betas=None, clip_sample=True,
                 clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                 prediction_type="epsilon", timestep_spacing="leading",
                 rescale_betas_zero_snr=False, thresholding=False, **unrelated_keys):
        # Defaults are diffusers' DDIMScheduler defaults, so a partial config means the same here.
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        if timestep_spacing not in SPACINGS:
            raise UserError(f"scheduler timestep_spacing {timestep_spacing!r} is not one of {SPACINGS}")
        if thresholding:
            raise UserError("scheduler thresholding=True (dynamic thresholding) is not supported")
        T = int(num_train_timesteps)
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            # Stable Diffusion's schedule: linear in sqrt(beta), i.e. the LDM paper's choice.
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            raise UserError(f"scheduler beta_schedule {beta_schedule!r} is not supported "
                            "(use 'linear' or 'scaled_linear')")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        self.num_train_timesteps = T
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.betas = betas                                      # (T,) float32
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) the DDIM paper's alpha_t
        # alpha for the step after the last one (x_0 itself): exactly 1, or SD's alpha at t=0.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(T - 1, -1, -1)
        self._prev = {}

    def set_timesteps(self, num_inference_steps):
        """Choose the sub-sequence tau of the T training steps that sampling visits (DDIM sec. 4.2);
        the three spacings are Table 2 of Lin et al. 2023."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= T:
            raise UserError(f"number of sampling steps must be in 1..{T}, got {num_inference_steps}")
        # numpy float64 arithmetic, as diffusers does it, so the rounding is identical to theirs
        if self.timestep_spacing == "leading":
            timesteps = np.arange(n)[::-1] * (T // n) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            # start exactly at T-1, the (zero-SNR) pure-noise step
            timesteps = np.round(np.arange(T, 0, -T / n)) - 1
        else:
            timesteps = np.linspace(0, T - 1, n).round()[::-1]
        timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self.timesteps = timesteps  # (n,) int64, descending
        # The step from tau_i goes to tau_{i-1}, the next entry (or to x_0 after the last one).
        # diffusers uses t - T//n instead, which is the same whenever the spacing is uniform.
        ts = timesteps.tolist()
        self._prev = dict(zip(ts, ts[1:] + [-1]))

    def _alpha(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output, t, sample, eta=0.0, noise=None, generator=None):
        """One DDIM update x_t -> x_{t_prev}; returns (prev_sample, pred_original_sample).

        model_output and sample are (B, C, H, W); `noise` (same shape) is the fresh Gaussian for
        eta > 0, otherwise drawn from `generator`.
        """
        t = int(t)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the schedule: call set_timesteps() first")
        alpha_t, alpha_prev = self._alpha(t), self._alpha(self._prev[t])
        beta_t = 1 - alpha_t
        x0, eps = self._x0_and_eps(model_output, sample, alpha_t)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        # DDIM eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev);
        # eta=0 is deterministic DDIM, eta=1 is DDPM's posterior variance.
        variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
        sigma = eta * variance ** 0.5
        # DDIM eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
        # With zero terminal SNR and eta=1, 1 - a_prev - sigma^2 is 0 up to rounding at the first
        # step; the clamp keeps a rounding-negative value from turning into NaN.
        direction = (1 - alpha_prev - sigma ** 2).clamp(min=0) ** 0.5
        prev = alpha_prev ** 0.5 * x0 + direction * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn(model_output.shape, generator=generator,
                                    dtype=model_output.dtype).to(model_output.device)
            prev = prev + sigma * noise
        return prev, x0

    def x0_and_eps(self, model_output, sample, t):
        """(x0, eps) estimates from the network output at timestep t, for any prediction type."""
        return self._x0_and_eps(model_output, sample, self._alpha(int(t)))

    def output_from_eps(self, eps, sample, t):
        """The network output (of this scheduler's prediction type) that means noise estimate
        `eps` at x_t = `sample`: the inverse of _x0_and_eps, so a guided eps can be stepped."""
        alpha_t = self._alpha(int(t))
        if self.prediction_type == "epsilon":
            return eps
        x0 = (sample - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
        if self.prediction_type == "sample":
            return x0
        return alpha_t ** 0.5 * eps - (1 - alpha_t) ** 0.5 * x0

    def _x0_and_eps(self, model_output, sample, alpha_t):
        """Turn the network output into (x0, eps) estimates for any prediction type.
        x_t = sqrt(a) x0 + sqrt(1-a) eps; v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, sec. 4)."""
        beta_t = 1 - alpha_t
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - beta_t ** 0.5 * eps) / alpha_t ** 0.5
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_t ** 0.5 * x0) / beta_t ** 0.5
        else:
            x0 = alpha_t ** 0.5 * sample - beta_t ** 0.5 * model_output
            eps = alpha_t ** 0.5 * model_output + beta_t ** 0.5 * sample
        return x0, eps

    def _coefs(self, timesteps, like):
        """(sqrt(a_t), sqrt(1 - a_t)) for a (B,) batch of timesteps, shaped (B, 1, 1, ...) like `like`."""
        a = self.alphas_cumprod.to(like.device)[timesteps.to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)

    def add_noise(self, x0, noise, timesteps):
        """Forward process q(x_t | x_0) (DDPM eq. 4): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        sa, sb = self._coefs(timesteps, x0)
        return sa * x0 + sb * noise

    def get_velocity(self, x0, noise, timesteps):
        """v-prediction training target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
        sa, sb = self._coefs(timesteps, x0)
        return sa * noise - sb * x0
