"""One LoRA training step at the SD1.5 shape: ours (model/lora.py on model/unet.py) vs diffusers'
UNet2DConditionModel + peft LoraConfig. Rank 4 on to_q/to_k/to_v/to_out.0 of every attention,
forward + MSE loss + backward + AdamW step, with and without gradient checkpointing.

    python bench/train_step.py                  # CPU fp32, 256 px (32x32 latents), batch 1 and 2
    python bench/train_step.py --device cuda --dtype bfloat16 --resolution 512 --batch-size 8

Each implementation runs in its own worker process (same weights file, same LoRA init, same
inputs), so its peak resident memory is its own; the parent makes them step in turns.
"Peak MB" is the process's peak RSS over the steps (CPU) or torch.cuda.max_memory_allocated;
"+ MB" is that peak minus the memory held before the first step (weights, inputs).
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RANK, ALPHA = 4, 4.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_init(names_shapes, seed=0):
    """{module name: (A (r, in), B (out, r))}, small random values drawn in name order: the same
    adapters for both implementations (B nonzero, so the loss checks that the adapters apply)."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(RANK, i, generator=g) * 0.01, torch.randn(o, RANK, generator=g) * 0.01)
            for n, (i, o) in sorted(names_shapes.items())}


def add_lora(impl, unet):
    """Inject rank-4 adapters; returns the trainable parameters."""
    unet.requires_grad_(False)
    if impl == "ours":
        from model.lora import layers as L
        L.inject_lora(unet, TARGETS, RANK, ALPHA)
        layers = dict(L.lora_layers(unet))
        init = lora_init({n: (m.base.in_features, m.base.out_features) for n, m in layers.items()})
        with torch.no_grad():
            for n, (a, b) in init.items():
                layers[n].lora_down.copy_(a)
                layers[n].lora_up.copy_(b)
        return L.lora_parameters(unet)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                init_lora_weights=True))
    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    init = lora_init({n: (m.in_features, m.out_features) for n, m in layers.items()})
    params = []
    with torch.no_grad():
        for n, (a, b) in init.items():
            layers[n].lora_A["default"].weight.copy_(a)
            layers[n].lora_B["default"].weight.copy_(b)
            params += [layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight]
    for p in params:
        p.requires_grad_(True)
    return params


def worker(spec):
    """The child process: one implementation, one (batch, checkpointing) setting."""
    device, dtype = torch.device(spec["device"]), C.DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    unet = C.load_sd15_unet(spec["impl"], spec["weights"], device, dtype)
    params = add_lora(spec["impl"], unet)
    for p in params:  # adapters, their gradients and Adam's moments in float32 (as lora_train)
        p.data = p.data.to(device, torch.float32)
    if spec["checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, cond = C.unet_inputs(spec["batch"], spec["resolution"], device, dtype)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    half = dtype != torch.float32

    def step():
        C.sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype, enabled=half):
            pred = unet(x, t, cond)
            pred = pred if torch.is_tensor(pred) else pred.sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        C.sync(device)
        return {"seconds": time.perf_counter() - t0, "loss": loss.item()}

    base = C.rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    if device.type == "cpu":
        C.reset_peak_rss()
    else:
        torch.cuda.reset_peak_memory_stats(device)

    def memory():
        peak = C.peak_rss_mb() if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / 2**20
        return {"peak": peak, "base": base}

    C.serve({"step": step, "memory": memory, "ready": lambda: {}})


def main():
    args = C.parser(__doc__).parse_args()
    if args.child:
        return worker(json.loads(args.child))
    device, dtype = C.setup(args)
    C.header("LoRA training step: ours vs diffusers + peft", args)
    weights = C.sd15_unet_file()
    rows, speedups = [], []
    for checkpointing in (False, True):
        for batch in args.batch_size:
            spec = dict(device=args.device, dtype=args.dtype, resolution=args.resolution,
                        batch=batch, checkpointing=checkpointing, weights=weights)
            workers = {impl: C.Worker(__file__, dict(spec, impl=impl)) for impl in ("diffusers", "ours")}
            for w in workers.values():
                w.call("ready")
            first = {k: w.call("step") for k, w in workers.items()}  # warm-up, and a parity check
            t = C.interleaved({k: (lambda w=w: w.call("step")["seconds"]) for k, w in workers.items()},
                              args.repeats, device, warmup=0)
            mem = {k: w.call("memory") for k, w in workers.items()}
            for w in workers.values():
                w.close()
            dloss = abs(first["ours"]["loss"] - first["diffusers"]["loss"])
            label = f"{args.resolution}px x{batch}" + (" ckpt" if checkpointing else "")
            for k in ("diffusers", "ours"):
                rows.append([label, k, f"{t[k] * 1e3:.0f}", C.ratio(t["diffusers"], t[k]),
                             f"{mem[k]['peak']:.0f}", f"{mem[k]['peak'] - mem[k]['base']:.0f}",
                             f"{dloss:.1e}" if k == "ours" else ""])
            speedups.append(f"{label} {C.ratio(t['diffusers'], t['ours'])} "
                            f"(memory {mem['ours']['peak'] / mem['diffusers']['peak']:.2f}x)")
            print(f"  done {label}", flush=True)
    C.table(["setting", "impl", "ms/step", "vs diffusers", "peak MB", "+ MB", "|loss diff|"], rows)
    print("speedup ours vs diffusers+peft: " + ", ".join(speedups))


if __name__ == "__main__":
    main()
