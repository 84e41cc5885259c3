"""Fixtures for the robustness tests (test_bad_inputs.py, test_kill_resume.py): tiny model files
made in-process in about a second, and the plumbing to run the four scripts as a user does, in a
subprocess, and to compare the folders they leave behind."""
import hashlib
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_NPZ = os.path.join(ROOT, "examples", "pathmnist_subset_28.npz")
SIZE = 64          # generated image side: 8x8 latents in the tiny SD
GEN = dict(steps=2, guidance=7.5, height=SIZE, width=SIZE)


def script_env(**extra):
    """The environment of a script run: one thread (2 shared cores), offline, unbuffered stdout
    (so a test can see a progress line as it is printed), no stray real cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(script, args):
    return [sys.executable, os.path.join(ROOT, script), *[str(a) for a in args]]


def run(script, args, cwd, env=None, timeout=300):
    return subprocess.run(command(script, args), cwd=cwd, env=env or script_env(), capture_output=True,
                          text=True, timeout=timeout)


def snapshot(folder, content=True):
    """{relative path: (size, mtime_ns, sha1)} of every file below `folder` ({} if it is absent);
    folders appear as (None, None, None) so an empty new folder counts as a change too."""
    out = {}
    if not os.path.exists(folder):
        return out
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = (None, None, None)
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            digest = None
            if content:
                with open(p, "rb") as fh:
                    digest = hashlib.sha1(fh.read()).hexdigest()
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def temp_files(folder):
    """Leftovers of interrupted atomic writes (model/io.atomic_write's .tmp-* files) and of other
    partial writes (.part) below `folder`."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files
                  if f.startswith(".tmp-") or f.endswith(".part")]
    return sorted(found)


def make_sd(folder, widths=None):
    """The tiny random SD1 of model/tiny.py; `widths` (e.g. (48, 96)) makes a variant whose UNet
    has other channel widths, so a LoRA trained for the standard one does not fit it."""
    from model.sd import tiny
    if widths is None:
        return tiny.make_tiny_sd(folder, kind="sd1", seed=0)
    unet, clip, sched = tiny.KINDS["sd1"]
    tiny.KINDS["wide"] = ({**unet, "block_out_channels": list(widths)}, clip, sched)
    try:
        return tiny.make_tiny_sd(folder, kind="wide", seed=0)
    finally:
        del tiny.KINDS["wide"]


def make_lora(sd_folder, path, seed=0, scale=0.05):
    """A rank-4 LoRA on the UNet's attention projections of `sd_folder`, with non-zero random
    up-weights (a freshly initialised LoRA is a no-op), saved as train_lora.py saves one."""
    from model.lora import files as LF, layers as L
    from model.sd.loader import load_pipeline
    pipe = load_pipeline(sd_folder)
    g = torch.Generator().manual_seed(seed)
    L.inject_lora(pipe.unet, L.TARGETS["unet_attn"], 4, 4.0, 0.0, g)
    with torch.no_grad():
        for _, m in L.lora_layers(pipe.unet):
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * scale)
    LF.save_lora(path, L.lora_state(pipe.unet), "diffusers",
                {"base_model": os.path.abspath(sd_folder), "resolution": SIZE, "kind": "sd1"})
    return path


def make_classifier(path, sd_folder=None, lora=None, k=0, j=1, seed=0, n=16):
    """A 16 px validator saved as train_classifier.py saves one. With `sd_folder`, it splits the
    images that model makes (GEN settings) between classes k and j about half and half
    (`_helpers_reject.coin`), so the reject loop both keeps and rejects."""
    from _helpers_reject import coin, new_classifier, save
    if sd_folder is None:
        return save(new_classifier(seed), path)
    from model.sd.loader import load_pipeline
    from model.lora.files import load_lora
    from model.lora.layers import inject_lora_weights, merge_lora
    pipe = load_pipeline(sd_folder)
    if lora:
        inject_lora_weights(pipe.unet, pipe.text_encoder, load_lora(lora)[0])
        merge_lora(pipe.unet)
    return save(coin(pipe, k, j, GEN, seed=seed, n=n), path)


# --------------------------------------------------------- script runs without the import cost
#
# Starting Python and importing torch, torchvision and transformers costs ~3 s of CPU per run:
# more than rejecting a bad input takes, and most of a tiny training run. A `Zygote` is ONE server
# process that imports them once and then forks a child per run: the child chdirs, takes the
# run's environment and argv and runs the unmodified script file as __main__ (its real
# `cli(main)` entry point, default SIGINT handling), stdout / stderr going to files. Each run is
# still its own process, which the test can signal by pid, and whose exit status it gets back.

PRELOAD = ("numpy", "PIL.Image", "tqdm", "safetensors.torch", "torch", "torchvision", "transformers",
           "transformers.models.clip.configuration_clip", "transformers.models.clip.modeling_clip",
           "transformers.models.clip.tokenization_clip", "model.io", "model.data", "model.sd.loader",
           "model.lora", "model.lora.train", "model.validator.classifier", "model.validator.train", "model.sd.sampling",
           "model.reject.loop", "model.reject.run_folder", "model.sd.tiny", "model.plots", "model.metrics", "model.eval.generation",
           "model.eval.fidelity", "model.eval.utility")


class Job:
    def __init__(self, id, out, err):
        self.id, self.out, self.err, self.pid, self.returncode = id, out, err, None, None

    @property
    def stdout(self):
        with open(self.out, errors="replace") as f:
            return f.read()

    @property
    def stderr(self):
        with open(self.err, errors="replace") as f:
            return f.read()


class Zygote:
    def __init__(self):
        import tempfile
        import threading
        self.tmp = tempfile.mkdtemp(prefix="medsynth-zygote-")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zygote"], env=script_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.cond = threading.Condition()
        self.jobs, self.next_id, self.ready = {}, 0, False
        threading.Thread(target=self._read, daemon=True).start()
        with self.cond:
            if not self.cond.wait_for(lambda: self.ready or self.proc.poll() is not None, timeout=300):
                raise RuntimeError("the zygote did not start")
        if not self.ready:
            raise RuntimeError("the zygote died while importing")

    def _read(self):
        import json
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if msg.get("ready"):
                    self.ready = True
                elif "pid" in msg:
                    self.jobs[msg["id"]].pid = msg["pid"]
                elif "exit" in msg:
                    self.jobs[msg["id"]].returncode = msg["exit"]
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def spawn(self, script, argv, cwd, env=None, timeout=300):
        """Start `python script argv...` in `cwd` (forked from the zygote); returns once it runs."""
        import json
        with self.cond:
            self.next_id += 1
            job = Job(self.next_id, os.path.join(self.tmp, f"{self.next_id}.out"),
                      os.path.join(self.tmp, f"{self.next_id}.err"))
            self.jobs[job.id] = job
        msg = {"id": job.id, "script": script, "argv": [str(a) for a in argv], "cwd": str(cwd),
               "env": env or script_env(), "out": job.out, "err": job.err, "timeout": int(timeout)}
        with self.cond:  # several test threads may spawn at once: one whole line each
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            self.cond.wait_for(lambda: job.pid is not None or self.proc.poll() is not None, timeout=60)
        if job.pid is None:
            raise RuntimeError("the zygote did not start the job")
        return job

    def wait(self, jobs, timeout=None, any_=False):
        """Wait until every job (or, with any_, one of them) has exited; True if so in time."""
        jobs = jobs if isinstance(jobs, (list, tuple)) else [jobs]
        test = any if any_ else all
        with self.cond:
            return self.cond.wait_for(lambda: test(j.returncode is not None for j in jobs), timeout=timeout)

    def run(self, script, argv, cwd, env=None, timeout=300):
        job = self.spawn(script, argv, cwd, env, timeout)
        if not self.wait(job, timeout + 30):
            raise RuntimeError(f"{script} {argv} did not finish")
        return job

    def run_many(self, specs, workers=2, timeout=300):
        """specs: [dict(script, argv, cwd, env)] -> [Job], at most `workers` running at once."""
        pending, running, done = list(specs), [], []
        while pending or running:
            while pending and len(running) < workers:
                running.append(self.spawn(timeout=timeout, **pending.pop(0)))
                done.append(running[-1])
            self.wait(running, timeout + 30, any_=True)
            running = [j for j in running if j.returncode is None]
        return done

    def close(self):
        import shutil
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _zygote_child(job):
    import runpy
    import signal
    import traceback
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    code = 1
    try:
        signal.alarm(job["timeout"])
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        script = os.path.join(ROOT, job["script"])
        sys.argv = [script, *job["argv"]]
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _zygote_server():
    import importlib
    import json
    import select
    sys.path.insert(0, ROOT)
    for name in PRELOAD:  # best effort: a module that fails here fails again, visibly, in the script
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    torch.set_num_threads(1)

    def send(msg):
        os.write(1, (json.dumps(msg) + "\n").encode())

    send({"ready": True})
    children, buf, eof = {}, b"", False
    while not eof or children:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            send({"id": children.pop(pid), "exit": os.waitstatus_to_exitcode(status)})
        if eof:
            time.sleep(0.02)
            continue
        if not select.select([0], [], [], 0.02)[0]:
            continue
        data = os.read(0, 1 << 16)
        if not data:
            eof = True
            for pid in children:  # the test is gone: stop what it started
                os.kill(pid, 9)
            continue
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _zygote_child(job)
            children[pid] = job["id"]
            send({"id": job["id"], "pid": pid})


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    import time
    _zygote_server()


KILL_AT = '''"""Run the script $KILL_SCRIPT (argv as given) and SIGKILL it at the point $KILL_POINT:
  write:NAME:N   halfway through the N-th atomic write of a file named NAME (its temp is left behind)
  call:MODULE.FUNCTION:N   on entering the N-th call of that function
"""
import os, runpy, signal, sys, importlib
sys.path.insert(0, {root!r})
target, point = os.environ["KILL_SCRIPT"], os.environ["KILL_POINT"]
kind, what, nth = point.split(":")
count = [0]


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "write":
    import io as _io
    import model.io as mio
    original = mio.atomic_write

    def atomic_write(path, write_fn, mode="wb"):
        if os.path.basename(path) == what:
            count[0] += 1
            if count[0] == int(nth):
                def half(f):
                    buf = _io.BytesIO() if "b" in mode else _io.StringIO()
                    write_fn(buf)
                    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                    f.flush()
                    die()
                return original(path, half, mode)
        return original(path, write_fn, mode)

    mio.atomic_write = atomic_write
else:
    module, _, name = what.rpartition(".")
    module = importlib.import_module(module)
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == int(nth):
            die()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
sys.argv = [target, *sys.argv[1:]]
runpy.run_path(target, run_name="__main__")
'''


def kill_at_script(path):
    """Write the KILL_AT wrapper script to `path` (run it like the script it wraps, with env
    KILL_SCRIPT = the script's path and KILL_POINT = where to die)."""
    with open(path, "w") as f:
        f.write(KILL_AT.replace("{root!r}", repr(ROOT)))
    return path
