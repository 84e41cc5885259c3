"""LoRA epoch time with cached latents (model/latent_cache.py, what train_lora.py does) vs encoding
every batch through the VAE encoder, at the SD1.5 shape (our UNet + rank-4 attention LoRA, our
SD1.5 VAE, random weights), on the PathMNIST sample in examples/.

    python bench/data.py                    # CPU fp32, 256 px, batch 1, 2-image epochs
    python bench/data.py --device cuda --dtype bfloat16 --resolution 512 --batch-size 8 --images 64

One epoch = every image once: fetch the batch's latents (memory-mapped cache read, or uint8
images -> resize -> VAE encode), then a full LoRA step (model.objective.diffusion_loss, backward,
AdamW). "data s" is the part of the epoch spent producing latents.
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from model.lora import layers as L  # noqa: E402
from model.data import load_split, resize_images  # noqa: E402
from model.sd.ddim import DDIMScheduler  # noqa: E402
from model.lora.latent_cache import build_cache, open_cache  # noqa: E402
from model.objective import diffusion_loss, sample_indices, step_noise  # noqa: E402
from model.sd.tiny import TINY_SCHEDULER  # noqa: E402

DATA = os.path.join(C.ROOT, "examples", "pathmnist_subset_28.npz")
VAE_SCALE = 0.18215


def sd15_vae(device, dtype):
    import diffusers
    from _helpers_sd import diffusers_kwargs, sd15_vae_config
    from model.sd.vae import AutoencoderKL
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKL(**diffusers_kwargs(sd15_vae_config()))
    with torch.device("meta"):
        vae = AutoencoderKL(**sd15_vae_config())
    vae.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return vae.to(device, dtype).eval().requires_grad_(False)


def main():
    p = C.parser(__doc__, batch_sizes=(1,))
    p.add_argument("--images", type=int, default=2, help="images per epoch")
    args = p.parse_args()
    device, dtype = C.setup(args)
    C.header("LoRA epoch: cached latents vs VAE-encoding every batch", args)
    data = load_split(DATA, "train")
    data.images, data.labels = data.images[:args.images], data.labels[:args.images]
    vae = sd15_vae(device, dtype)
    t0 = time.perf_counter()
    folder = os.path.join(tempfile.mkdtemp(prefix="medsynth-bench-cache-"), "latents")
    build_cache(folder, data, vae, VAE_SCALE, args.resolution, show_progress=False)
    build_seconds = time.perf_counter() - t0
    latents, labels, _ = open_cache(folder)

    unet = C.sd15_unets(device, dtype, which=("ours",))["ours"].requires_grad_(False)
    L.inject_lora(unet, L.TARGETS["unet_attn"], rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
    unet.train()
    params = L.lora_parameters(unet)
    for prm in params:
        prm.data = prm.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDIMScheduler(**TINY_SCHEDULER)
    cond = torch.randn(len(data.classes), 77, 768, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    half = dtype != torch.float32

    def cached(idx):
        return torch.from_numpy(latents[idx]).to(device)

    @torch.no_grad()
    def encoded(idx):  # what build_cache does, per batch
        x = resize_images(data.images[torch.from_numpy(idx)].float(), args.resolution) / 127.5 - 1.0
        mean, _ = vae.encode(x.to(device, dtype))
        return mean.float() * VAE_SCALE

    def epoch(fetch, data_time):
        n, b = len(data), args.batch_size[0]
        for step in range(-(-n // b)):
            idx = sample_indices(n, 0, step * b, min(b, n - step * b))
            C.sync(device)
            t0 = time.perf_counter()
            x0 = fetch(idx)
            C.sync(device)
            data_time.append(time.perf_counter() - t0)
            noise, t, offset = step_noise(0, step, len(idx), x0.shape[1:], scheduler.num_train_timesteps)
            with torch.autocast(device.type, dtype, enabled=half):
                loss = diffusion_loss(unet, scheduler, x0, cond[torch.from_numpy(labels[idx])].to(device),
                                      noise.to(device), t.to(device), offset.to(device), 0.0, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    data_times = {"VAE every batch": [], "cached latents": []}
    fetchers = {"VAE every batch": encoded, "cached latents": cached}
    t = C.interleaved({k: (lambda k=k: epoch(fetchers[k], data_times[k])) for k in fetchers},
                      args.repeats, device)
    steps = -(-len(data) // args.batch_size[0])
    # median over the timed epochs (the warm-up epoch is the first `steps` entries)
    latent_s = {k: float(np.median(np.array(v[steps:]).reshape(-1, steps).sum(1))) for k, v in data_times.items()}
    rows = [[k, f"{t[k]:.1f}", f"{latent_s[k]:.4f}", C.ratio(t["VAE every batch"], t[k]),
             C.ratio(latent_s["VAE every batch"], latent_s[k])] for k in fetchers]
    print(f"{len(data)} images per epoch, batch {args.batch_size[0]}, {args.resolution} px; "
          f"building the cache once took {build_seconds:.1f} s")
    C.table(["latents from", "epoch s", "data s/epoch", "epoch speedup", "data speedup"], rows)
    print(f"speedup cached vs VAE every batch: epoch {C.ratio(t['VAE every batch'], t['cached latents'])}, "
          f"producing latents {C.ratio(latent_s['VAE every batch'], latent_s['cached latents'])}")


if __name__ == "__main__":
    main()
