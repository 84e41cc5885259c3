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
    """Our VAE at the published SD1.5 shape with diffusers' random init (seeded), frozen."""
    import diffusers
    from model.sd.convert import SD_VAE
    from model.sd.vae import AutoencoderKL
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKL(**SD_VAE)
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    vae.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return vae.to(device, dtype).eval().requires_grad_(False)


def lora_unet(device, dtype):
    """Our SD1.5 UNet (random weights, frozen) with a rank-4 attention LoRA kept in float32, as
    train_lora.py trains it; -> (unet, its AdamW)."""
    unet = C.sd15_unets(device, dtype, which=("ours",))["ours"].requires_grad_(False)
    L.inject_lora(unet, L.TARGETS["unet_attn"], rank=4, alpha=4, generator=torch.Generator().manual_seed(0))
    unet.train()
    params = L.lora_parameters(unet)
    for prm in params:
        prm.data = prm.data.float()
    return unet, torch.optim.AdamW(params, lr=1e-4)


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

    unet, opt = lora_unet(device, dtype)
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
        count, batch = len(data), args.batch_size[0]
        for step in range(-(-count // batch)):
            idx = sample_indices(count, 0, step * batch, min(batch, count - step * batch))
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
    seconds = C.interleaved({k: (lambda k=k: epoch(fetchers[k], data_times[k])) for k in fetchers},
                            args.repeats, device)
    print(f"{len(data)} images per epoch, batch {args.batch_size[0]}, {args.resolution} px; "
          f"building the cache once took {build_seconds:.1f} s")
    report(seconds, data_times, -(-len(data) // args.batch_size[0]))


def report(seconds, data_times, steps):
    """The table: epoch seconds, and the part spent producing latents, per way of producing them."""
    # median over the timed epochs (the warm-up epoch is the first `steps` entries)
    latent_s = {k: float(np.median(np.array(v[steps:]).reshape(-1, steps).sum(1)))
                for k, v in data_times.items()}
    slow, fast = "VAE every batch", "cached latents"
    rows = [[k, f"{seconds[k]:.1f}", f"{latent_s[k]:.4f}", C.ratio(seconds[slow], seconds[k]),
             C.ratio(latent_s[slow], latent_s[k])] for k in (slow, fast)]
    C.table(["latents from", "epoch s", "data s/epoch", "epoch speedup", "data speedup"], rows)
    print(f"speedup cached vs VAE every batch: epoch {C.ratio(seconds[slow], seconds[fast])}, "
          f"producing latents {C.ratio(latent_s[slow], latent_s[fast])}")


if __name__ == "__main__":
    main()
