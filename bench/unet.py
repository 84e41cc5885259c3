"""UNet forward, ours vs diffusers' UNet2DConditionModel (its default SDPA attention), at the full
SD1.5 shape with the same random weights and inputs.

    python bench/unet.py                      # CPU fp32: 256 px batch 1 and 2, 512 px batch 1
    python bench/unet.py --compile            # adds torch.compile(ours) (slow to compile)
    python bench/unet.py --device cuda --dtype float16 --resolution 512 --batch-size 8

GFLOP/s counts FLOPs with torch.utils.flop_counter; "% peak" divides by what a large matmul
in the same dtype achieves on this machine, measured in the same interleaved rounds.
"""
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MATMUL_N = 2048  # 17 GFLOP: long enough to reach the BLAS peak, short enough to repeat


def count_flops(res, batch):
    """FLOPs of one forward, counted on the meta device (no compute): there SDPA decomposes into
    matmuls the counter sees, while the CPU flash-attention kernel is invisible to it."""
    from model.sd.convert import SD15_UNET
    from model.sd.unet import UNet2DConditionModel
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        UNet2DConditionModel(**SD15_UNET)(*C.unet_inputs(batch, res, "meta", torch.float32))
    return counter.get_total_flops()


def main():
    p = C.parser(__doc__, resolution=None, batch_sizes=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    args = p.parse_args()
    device, dtype = C.setup(args)
    if args.resolution or args.batch_size:  # a user-chosen grid, e.g. the GPU run
        shapes = [(args.resolution or 256, b) for b in (args.batch_size or [1])]
    else:
        shapes = [(256, 1), (256, 2), (512, 1)]
    C.header("UNet forward: ours vs diffusers", args)
    unets = C.sd15_unets(device, dtype)
    variants = {"diffusers": unets["diffusers"], "ours": unets["ours"]}
    if args.compile:
        variants["ours+compile"] = torch.compile(unets["ours"])
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=dtype)

    rows, speedups = [], []
    for res, batch in shapes:
        inputs = C.unet_inputs(batch, res, device, dtype)
        with torch.no_grad():
            out = {k: m(*inputs) for k, m in variants.items()}  # also the compile's warm-up
            ref = out["diffusers"].sample if hasattr(out["diffusers"], "sample") else out["diffusers"]
            diff = max((o - ref).abs().max().item() for k, o in out.items() if k != "diffusers")
            fns = {k: (lambda m=m: m(*inputs)) for k, m in variants.items()}
            fns["matmul"] = lambda: a @ a
            t = C.interleaved(fns, args.repeats, device)
        peak = 2 * MATMUL_N ** 3 / t["matmul"]
        flops = count_flops(res, batch)
        for k in variants:
            rate = flops / t[k]
            rows.append([f"{res}px ({res // 8}x{res // 8} latent) x{batch}", k, f"{t[k] * 1e3:.0f}",
                         f"{rate / 1e9:.0f}", f"{100 * rate / peak:.0f}%",
                         C.ratio(t["diffusers"], t[k]), f"{diff:.1e}" if k != "diffusers" else ""])
        speedups.append(f"{res}px x{batch} {C.ratio(t['diffusers'], t['ours'])}")
        print(f"  {res}px x{batch}: {flops / 1e9:.0f} GFLOP per forward, "
              f"matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    C.table(["shape", "impl", "ms", "GFLOP/s", "% peak", "vs diffusers", "max |diff|"], rows)
    print("speedup ours vs diffusers: " + ", ".join(speedups))


if __name__ == "__main__":
    main()
