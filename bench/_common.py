"""What the bench scripts share: options, the environment header, interleaved timing, peak memory
measured in a child process, and the same random SD1.5 weights in our UNet and diffusers'.

Timing protocol (issue 7): every variant is warmed up, then the variants run in turns
(A B A B ..., the order rotated each round), and each reports the median of its timings. A load
spike on this shared machine then hits every variant alike, and the ratios stay meaningful even
when the absolute times do not.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model.sd.loader import DTYPES  # noqa: E402  (the one table of dtype names)


def parser(description, resolution=256, batch_sizes=(1, 2), repeats=5):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--resolution", type=int, default=resolution, help="image side in pixels")
    p.add_argument("--batch-size", type=int, nargs="+", default=list(batch_sizes) if batch_sizes else None)
    p.add_argument("--repeats", type=int, default=repeats, help="timings per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: memory probe
    return p


def setup(args):
    """Apply --threads, resolve the device and dtype; returns (device, dtype)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), DTYPES[args.dtype]


def header(title, args):
    """One line per fact a reader needs to compare these numbers with others."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import diffusers
    print(f"# {title}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}")
    print(f"device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f" ({cpu})")
          + f", dtype {args.dtype}, threads {torch.get_num_threads()} of {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"timing: warm-up, then variants interleaved, median of {args.repeats}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants, repeats, device, warmup=1):
    """{name: fn} -> {name: median seconds}. Every fn runs `warmup` times, then `repeats` rounds of
    one call each, round r starting at variant r (rotation: none is always first after a pause)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            out = variants[name]()
            sync(device)
            # A variant that runs in a Worker times itself and returns the seconds.
            times[name].append(out if isinstance(out, float) else time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(header_row, rows):
    """Print a plain aligned table (also readable pasted into markdown as a code block)."""
    cells = [[str(c) for c in header_row]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header_row))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------------- models

def sd15_unet_file(seed=0):
    """A safetensors file of random SD1.5 UNet weights (diffusers' init, seeded), written once to
    the temp folder: worker processes load it in seconds instead of re-running the init."""
    import tempfile
    from safetensors.torch import save_file
    path = os.path.join(tempfile.gettempdir(), f"medsynth-bench-sd15-unet-{seed}.safetensors")
    if not os.path.exists(path):
        unet = sd15_unets(torch.device("cpu"), torch.float32, which=("diffusers",), seed=seed)
        save_file(unet["diffusers"].state_dict(), path + ".part")
        os.replace(path + ".part", path)
    return path


def load_sd15_unet(impl, path, device, dtype):
    """impl "ours" | "diffusers" UNet holding the weights of `path`, built without a second copy."""
    import diffusers
    from safetensors.torch import load_file
    from model.sd.convert import SD15_UNET
    from model.sd.unet import UNet2DConditionModel
    with torch.device("meta"):
        if impl == "ours":
            unet = UNet2DConditionModel(**SD15_UNET)
        else:
            unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    # clone: load_file's tensors may be views of the mapped file, resident only once touched,
    # which would count the weights as memory of the first step.
    state = {k: v.to(device, dtype).clone() for k, v in load_file(path).items()}
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def sd15_unets(device, dtype, which=("ours", "diffusers"), seed=0):
    """The published SD1.5 UNet with random weights (diffusers' own init, seeded) as
    {"diffusers": diffusers' UNet2DConditionModel, "ours": model.sd.unet's}. Both share the same
    parameter tensors (load_state_dict(assign=True)), so two of them cost one UNet of memory."""
    import diffusers
    from model.sd.convert import SD15_UNET
    from model.sd.unet import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**SD15_UNET)
    if (device.type, dtype) != ("cpu", torch.float32):  # .to() warns even when it is a no-op
        ref.to(device, dtype)
    ref.eval()
    out = {}
    if "ours" in which:
        with torch.device("meta"):
            ours = UNet2DConditionModel(**SD15_UNET)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
        out["ours"] = ours.eval()
    if "diffusers" in which:
        out["diffusers"] = ref
    del ref
    gc.collect()
    return out


def unet_inputs(batch, resolution, device, dtype, seed=0):
    """(latents (B, 4, r/8, r/8), timesteps (B,), text tokens (B, 77, 768)) for SD1.5."""
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    c = torch.randn(batch, 77, 768, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device, dtype), t.to(device), c.to(device, dtype)


# --------------------------------------------------------------------- memory, in a child process

def rss_mb():
    """Current resident set size in MB (Linux /proc; the memory a job actually occupies)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def reset_peak_rss():
    """Restart the kernel's peak-RSS (VmHWM) count from the current RSS (Linux >= 4.0), so the
    peak seen afterwards belongs to the step measured and not to model construction."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


class Worker:
    """A variant living in its own process (`script --child <spec json>`): its peak memory is its
    own, with nothing cached by the allocator for another variant, while the parent still runs
    the variants in turns. Protocol: one JSON command per line in, one JSON reply per line out."""

    def __init__(self, script, spec):
        self.proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, command, **kwargs):
        self.proc.stdin.write(json.dumps({"command": command, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve(handlers):
    """The child side of Worker: answer commands with handlers[command](**kwargs) until EOF.
    The replies go to the real stdout; anything else the child prints goes to stderr."""
    out, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        msg = json.loads(line)
        out.write(json.dumps(handlers[msg.pop("command")](**msg)) + "\n")
        out.flush()


def ratio(a, b):
    return f"{a / b:.2f}x"
