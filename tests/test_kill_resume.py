"""Killed at a random moment and rerun with the same command, every stage ends where an
uninterrupted run ends, and a finished run is left alone.

For each stage (train_lora.py --preset tiny, train_classifier.py on a subset, sample_validated.py
on the tiny SD) a module fixture
  1. runs the command uninterrupted: the reference; then reruns it: that must say "nothing to
     do" and leave every file as it was (bytes and mtimes);
  2. for each seed: starts the same command in the same folder path (paths are recorded in the
     outputs, so all runs use one path and finished folders are moved aside), sends SIGKILL
     (one seed per stage: SIGINT, i.e. Ctrl-C) after a delay drawn from the seed, uniform over
     one slice of a full run's time (the seeds' slices cover its first 60%), and reruns the
     command to completion;
  3. kills it (SIGKILL) at chosen points too: halfway through writing a checkpoint / state /
     manifest (a temp file is left, which the rerun must remove), for the LoRA between a step's
     work and its checkpoint, for the classifier between its first classifier.safetensors and
     its first state.pt (nothing to resume from, yet outputs exist: the rerun starts over).
The tests then compare every resumed folder with the reference: the same set of files, every
file byte-identical except the timings in logs and resumable state (compared field by field,
tensors bit for bit), no temp files (.tmp-* of model/io.atomic_write, .part) left behind.

The three stages run side by side (one thread each) and every script run is a process forked
from one that has imported torch once (_helpers_pipeline.Zygote), so a kill lands in the work,
not in the imports.
"""
import csv
import json
import os
import random
import signal
import threading
import time

import pytest
import torch

from _helpers_pipeline import (EXAMPLE_NPZ, ROOT, Zygote, kill_at_script, make_classifier, make_lora, make_sd,
                               script_env, snapshot, temp_files)

SEEDS = {"lora": [1, 2, 3], "classifier": [1, 2, 3], "sample": [1, 2, 3]}
SIGINT_SEED = 2    # this seed sends Ctrl-C instead of SIGKILL
# Kills at chosen moments as well (see _helpers_pipeline.KILL_AT), where a random kill rarely lands:
# mid-write, so a temp file is left behind, and between a checkpoint and the files of its step.
POINTS = {
    "lora": ["call:model.lora.train._sample_grid:1",     # step 8: before its grid, log and checkpoint
             "write:checkpoint-000016.pt:1"],
    "classifier": ["write:state.pt:2",                    # epoch 2's state, half written
                   "call:model.validator.train._write_log:1"],   # epoch 1: classifier saved, no state
    "sample": ["write:manifest.csv:3"],                   # batch 3's images saved, manifest half written
}
TIMING = {"time_s", "elapsed", "wall_time_s", "seconds_last_session", "seconds", "seconds_total"}


# ---------------------------------------------------------------------------------- the stages

def lora_argv(fx, out):
    return ["--preset", "tiny", "--out", out, "--max-steps", "24", "--batch-size", "2", "--save-every", "4",
            "--sample-every", "8", "--sample-steps", "2"]


def classifier_argv(fx, out):
    return ["--data", EXAMPLE_NPZ, "--out", out, "--few-shot", "4", "--image-size", "16", "--epochs", "3",
            "--batch-size", "8"]


def sample_argv(fx, out):
    return ["--model", f"{fx}/sd", "--lora", f"{fx}/lora.safetensors", "--classifier", f"{fx}/clf.safetensors",
            "--classes", "0", "1", "--per-class", "3", "--batch-size", "2", "--steps", "2", "--resolution", "64",
            "--max-attempts", "4", "--keep-rejected", "--out", out]


STAGES = {
    "lora": dict(script="train_lora.py", argv=lora_argv),
    "classifier": dict(script="train_classifier.py", argv=classifier_argv),
    "sample": dict(script="sample_validated.py", argv=sample_argv),
}


# ----------------------------------------------------------------------------- the campaign

@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fixtures"))
    make_sd(os.path.join(folder, "sd"))
    make_lora(os.path.join(folder, "sd"), os.path.join(folder, "lora.safetensors"))
    make_classifier(os.path.join(folder, "clf.safetensors"), os.path.join(folder, "sd"),
                    os.path.join(folder, "lora.safetensors"))
    return folder


def campaign(zygote, fx, root, name):
    """Reference run, finished-run rerun, then kill-and-resume per seed; folders end up in
    root/name/{ref,seed-N}. Returns a dict of what happened."""
    stage = STAGES[name]
    base = os.path.join(root, name)
    work = os.path.join(base, "run")     # every run happens here: recorded paths are equal
    os.makedirs(base)
    argv = stage["argv"](fx, work)
    report = {"seeds": {}}

    t0 = time.time()
    ref = zygote.run(stage["script"], argv, cwd=base)
    report["ref_seconds"] = duration = time.time() - t0
    report["ref"] = (ref.returncode, ref.stderr[-3000:])
    if ref.returncode != 0:
        return report
    before = snapshot(work)
    time.sleep(0.05)
    again = zygote.run(stage["script"], argv, cwd=base)
    report["again"] = (again.returncode, again.stdout[-2000:] + again.stderr[-2000:], before, snapshot(work))
    os.rename(work, os.path.join(base, "ref"))

    for k, seed in enumerate(SEEDS[name]):
        # Seed k draws its delay from the k-th of len(SEEDS) equal slices of 60% of a full run's
        # time (the reference's, or the latest run that ended before its kill: the machine's load
        # changes as the other stages finish), so that the kills spread over the run.
        rng = random.Random(f"{name}:{seed}")
        sig = signal.SIGINT if seed == SIGINT_SEED else signal.SIGKILL
        delay = 0.6 * duration * (k + rng.random()) / len(SEEDS[name])
        job = zygote.spawn(stage["script"], argv, cwd=base)
        t0 = time.time()
        zygote.wait(job, timeout=delay)
        if job.returncode is None:
            os.kill(job.pid, sig)
        else:
            duration = time.time() - t0
        zygote.wait(job)
        killed = {"signal": sig.name, "delay": round(time.time() - t0, 2), "returncode": job.returncode,
                  "stderr": job.stderr[-3000:], "left": sorted(snapshot(work, content=False))}
        resumed = zygote.run(stage["script"], argv, cwd=base)
        killed["rerun"] = (resumed.returncode, resumed.stderr[-3000:])
        killed["folder"] = os.path.join(base, f"seed-{seed}")
        os.rename(work, killed["folder"])
        report["seeds"][seed] = killed

    wrapper = kill_at_script(os.path.join(base, "kill_at.py"))
    for i, point in enumerate(POINTS[name]):
        env = script_env(KILL_SCRIPT=os.path.join(ROOT, stage["script"]), KILL_POINT=point)
        job = zygote.run(wrapper, argv, cwd=base, env=env)
        killed = {"signal": "SIGKILL", "delay": point, "returncode": job.returncode, "stderr": job.stderr[-3000:],
                  "left": sorted(snapshot(work, content=False)), "temps": temp_files(work)}
        resumed = zygote.run(stage["script"], argv, cwd=base)
        killed["rerun"] = (resumed.returncode, resumed.stderr[-3000:])
        killed["folder"] = os.path.join(base, f"point-{i}")
        os.rename(work, killed["folder"])
        report["seeds"][f"point-{i}"] = killed
    return report


@pytest.fixture(scope="module")
def runs(fx, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kill_resume"))
    zygote = Zygote()
    reports, errors = {}, {}

    def go(name):
        try:
            reports[name] = campaign(zygote, fx, root, name)
        except BaseException as e:  # noqa: BLE001 - reported by the tests
            errors[name] = repr(e)

    try:
        threads = [threading.Thread(target=go, args=(n,)) for n in STAGES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        zygote.close()
    for name, r in reports.items():  # shown with pytest -s: where the kills landed
        print(f"\n{name}: reference {r.get('ref_seconds', 0):.1f}s; kills: " + ", ".join(
            f"{s} {k['signal']} at {k['delay']}s -> exit {k['returncode']} ({len(k['left'])} files left)"
            for s, k in r["seeds"].items()))
    yield root, reports, errors
    for folder, _, files in os.walk(root):  # the classifier's files are 45-180 MB each: the rest stays
        for f in files:
            if f in ("state.pt", "classifier.safetensors"):
                os.remove(os.path.join(folder, f))


def stage_report(runs, name):
    root, reports, errors = runs
    assert name not in errors, errors[name]
    report = reports[name]
    assert report["ref"][0] == 0, f"the reference run failed:\n{report['ref'][1]}"
    return root, report


# ------------------------------------------------------------------------------ comparisons

def same(a, b, where):
    """Deep equality ignoring timing fields; tensors bit for bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - TIMING
        for k in sorted(keys, key=str):
            assert k in a and k in b, f"{where}: key {k!r} only in one of them"
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def lora_log(rows):
    return [list(r[:3]) for r in rows]  # step, loss, lr (the 4th column is wall-clock seconds)


def compare_file(name, rel, ref, got):
    a, b = os.path.join(ref, rel), os.path.join(got, rel)
    base = os.path.basename(rel)
    if base.endswith(".pt"):
        x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        if name == "lora":
            x["log"], y["log"] = lora_log(x["log"]), lora_log(y["log"])
        same(x, y, rel)
    elif base == "loss.csv":
        with open(a) as fa, open(b) as fb:
            same(lora_log(list(csv.reader(fa))), lora_log(list(csv.reader(fb))), rel)
    elif base.endswith(".json"):
        with open(a) as fa, open(b) as fb:
            same(json.load(fa), json.load(fb), rel)
    elif base.endswith(".jsonl"):
        with open(a) as fa, open(b) as fb:
            same([json.loads(ln) for ln in fa], [json.loads(ln) for ln in fb], rel)
    elif base == "manifest.csv":
        with open(a) as fa, open(b) as fb:
            ra, rb = list(csv.reader(fa)), list(csv.reader(fb))
        assert ra[0] == rb[0] and sorted(ra[1:]) == sorted(rb[1:]), f"{rel}: rows differ"
        assert read_bytes(a) == read_bytes(b), f"{rel}: same rows, other bytes"
    else:  # weights (.safetensors, .npy), images, configs, tokenizer: byte for byte
        assert read_bytes(a) == read_bytes(b), f"{rel}: bytes differ"


def compare_folders(name, ref, got):
    files_ref = {k for k, v in snapshot(ref, content=False).items() if v[0] is not None}
    files_got = {k for k, v in snapshot(got, content=False).items() if v[0] is not None}
    assert files_got == files_ref, (f"other files: missing {sorted(files_ref - files_got)}, "
                                    f"extra {sorted(files_got - files_ref)}")
    for rel in sorted(files_ref):
        compare_file(name, rel, ref, got)


# ------------------------------------------------------------------------------------ tests

CASES = [pytest.param(name, seed, id=f"{name}-seed{seed}-{'SIGINT' if seed == SIGINT_SEED else 'SIGKILL'}")
          for name in STAGES for seed in SEEDS[name]]
CASES += [pytest.param(name, f"point-{i}", id=f"{name}-at-{point.rsplit(':', 1)[0]}")
          for name in STAGES for i, point in enumerate(POINTS[name])]


@pytest.mark.parametrize("name,seed", CASES)
def test_killed_and_rerun_equals_uninterrupted(runs, name, seed):
    root, report = stage_report(runs, name)
    k = report["seeds"][seed]
    shown = f"killed after {k['delay']}s with {k['signal']} -> exit {k['returncode']}; left {k['left']}"
    if k["signal"] == "SIGINT":
        # Ctrl-C: cli() says how to resume and exits 130 (or the run had just finished)
        assert k["returncode"] in (130, 0), f"{shown}\n{k['stderr']}"
        assert "Traceback" not in k["stderr"], k["stderr"]
        if k["returncode"] == 130:
            assert "rerun the same command to resume" in k["stderr"]
    elif str(seed).startswith("point"):
        assert k["returncode"] == -signal.SIGKILL, f"{shown}: the kill point was never reached\n{k['stderr']}"
        if k["delay"].startswith("write:"):
            assert k["temps"], f"{shown}: a kill mid-write should leave its temp file (the rerun must remove it)"
    else:
        assert k["returncode"] in (-signal.SIGKILL, 0), f"{shown}\n{k['stderr']}"
    assert k["rerun"][0] == 0, f"{shown}\nrerun failed:\n{k['rerun'][1]}"
    got = k["folder"]
    assert os.path.isdir(got) and temp_files(got) == [], f"{shown}: temp files left behind"
    compare_folders(name, os.path.join(root, name, "ref"), got)


@pytest.mark.parametrize("name", list(STAGES))
def test_kills_landed_inside_the_runs(runs, name):
    """The test is only worth something if the runs were really interrupted."""
    _, report = stage_report(runs, name)
    seeds = {s: k for s, k in report["seeds"].items() if s in SEEDS[name]}
    interrupted = [s for s, k in seeds.items() if k["returncode"] != 0]
    assert len(interrupted) >= 2, {s: (k["delay"], k["returncode"]) for s, k in seeds.items()}


@pytest.mark.parametrize("name", list(STAGES))
def test_rerun_of_a_finished_run_changes_nothing(runs, name):
    _, report = stage_report(runs, name)
    code, output, before, after = report["again"]
    assert code == 0, output
    assert after == before, f"files rewritten: {sorted(k for k in after if after[k] != before.get(k))}"
    assert "nothing to do" in output
