"""Plumbing shared by the scripts and their loops (LoRA, the validator, mini pretraining, sampling).

Seeds and RNG state (for exact resume), the device, the one `--mixed-precision` setting every
script takes, the learning-rate schedule, the weight average (EMA), a Ctrl-C that stops between
two steps, and torch.distributed for `torchrun` (NCCL on GPUs,
gloo on CPU): joining the group, averaging tensors over ranks, sharing rank 0's objects.
"""
import contextlib
import signal
import threading
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from model.io import UserError
from model.sd.loader import DTYPES

# `--mixed-precision` in every script: "no" is float32; fp16 / bf16 are the half dtypes.
PRECISIONS = ("auto", "no", "fp16", "bf16")
PRECISION_HELP = ("auto | no | fp16 | bf16 (default: auto = bf16 on GPUs that have it, else fp16; "
                  "no on CPU and mps)")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    """'auto' -> cuda if present, else mps, else cpu; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        # Under torchrun each process must take its own GPU, not all GPU 0.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def lr_at(step, max_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_precision(device, name):
    """One of PRECISIONS on `device` -> "no" | "fp16" | "bf16". auto: bf16 on a CUDA GPU that
    supports it, else fp16 there (half the memory, tensor cores); "no" on CPU and mps, where half
    precision is slower or unsupported. fp16 is CUDA-only (bf16 also runs on CPU)."""
    if name not in PRECISIONS:
        raise UserError(f"--mixed-precision {name!r}: choose from {', '.join(PRECISIONS)}")
    if name == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "no"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this device")
    return name


def precision_dtype(name):
    """"no" | "fp16" | "bf16" -> torch.float32 | float16 | bfloat16."""
    return DTYPES["fp32" if name == "no" else name]


def autocast(device, mixed_precision):
    """Autocast context for one of PRECISIONS on `device` ("no": none)."""
    mixed_precision = resolve_precision(device, mixed_precision)
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(mixed_precision))


def grad_scaler(device, mixed_precision):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    enabled = resolve_precision(device, mixed_precision) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def rng_state():
    """Every RNG a training step draws from, as tensors (safe for torch.load(weights_only=True))."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- torch.distributed: `torchrun --nproc_per_node N script.py ...` sets RANK / WORLD_SIZE ---

def init_distributed(device):
    """Join the process group when launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensors):
    """Average tensors over ranks in one flat all-reduce. The LoRA gradients are a few MB, so this
    is all DDP would do for us; doing it by hand keeps accumulation and checkpointing simple."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def share_from_main(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


class StopOnSigint:
    """The first Ctrl-C only sets `hit`, so the loop saves between two optimizer steps; a second
    Ctrl-C interrupts at once."""

    def __enter__(self):
        self.hit, self.prev = False, None
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True
        signal.signal(signal.SIGINT, self.prev)

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


@torch.no_grad()
def ema_update(avg, net, decay):
    """avg <- decay * avg + (1 - decay) * net, for every floating-point tensor of the state."""
    for a, p in zip(avg.state_dict().values(), net.state_dict().values()):
        if a.dtype.is_floating_point:
            a.lerp_(p, 1 - decay)
        else:
            a.copy_(p)
