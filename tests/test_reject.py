"""The reject-sampling loop (model/reject/loop.py), its run folder (model/reject/run_folder.py)
and sample_validated.py, on a tiny random SD with validators whose verdicts the test controls
(tests/_helpers_reject.py)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers_reject import always, coin, save
from model.sd.loader import load_pipeline
from model.data import PATHMNIST_CLASSES
from model.reject.run_folder import RunFolder, image_file, read_manifest, row_key
from model.reject.loop import Settings, by_item, candidate_seed, costs, reject_sample, replay, round_batches
from model.sd.tiny import make_tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = dict(steps=3, guidance=7.5, eta=0.0, height=32, width=32)  # 4x4 latents: fast, every code path
PROMPTS = {2: "an H&E image of debris", 5: "an H&E image of smooth muscle"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_sd(str(tmp_path_factory.mktemp("tiny-sd")))
    pipe = load_pipeline(folder)
    return folder, pipe, coin(pipe, 2, 5, GEN)


def run_loop(pipe, clf, out, rows=(), crash_after=None, **settings):
    """The loop as sample_validated.py drives it, into a RunFolder that keeps every image
    (accepted ones in their class folder, rejected ones by attempt) and rewrites the manifest
    after each batch."""
    settings = Settings(**{"batch_size": 3, **GEN, **settings})
    batches = []

    def on_batch(all_rows):
        batches.append(len(all_rows))
        if crash_after is not None and len(batches) == crash_after:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two batches (manifest written)

    folder = RunFolder(out, keep_rejected=True)
    return reject_sample(pipe, clf, PROMPTS, PATHMNIST_CLASSES, settings, rows, folder=folder,
                         on_batch=on_batch), settings


def files_of(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".png"):
                with open(os.path.join(root, n), "rb") as f:
                    out[os.path.relpath(os.path.join(root, n), folder)] = hashlib.md5(f.read()).hexdigest()
    return out


def classify_file(clf, path):
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]
    return clf.predict_proba(x)[0]


def test_batches_depend_on_the_state_only():
    items = [(c, i) for c in (0, 3) for i in range(4)]
    state = {}
    assert round_batches(items, state, 1, 3) == [items[0:3], items[3:6], items[6:8]]
    rejected = {(0, 1), (3, 0), (3, 3)}
    for it in items:
        state[it] = {1: {"accepted": int(it not in rejected)}}
    assert round_batches(items, state, 2, 3) == [[(0, 1), (3, 0), (3, 3)]]
    # a later round's rows do not move the cut points of an earlier one (resuming mid-round)
    state[(0, 1)][2] = {"accepted": 0}
    assert round_batches(items, state, 1, 3) == [items[0:3], items[3:6], items[6:8]]
    assert round_batches(items, state, 3, 3) == [[(0, 1)]]
    seeds = {candidate_seed(0, c, i, a) for c in range(9) for i in range(20) for a in range(1, 6)}
    assert len(seeds) == 9 * 20 * 5 and max(seeds) < 2 ** 53
    assert candidate_seed(1, 2, 3, 4) != candidate_seed(0, 2, 3, 4)


def test_accepting_and_rejecting_validators(tiny, tmp_path):
    """always(2) accepts every debris candidate at once and rejects every smooth-muscle one until
    --max-attempts; nothing loops past it."""
    _, pipe, _ = tiny
    rows, s = run_loop(pipe, always(2), str(tmp_path), per_class=3, max_attempts=2)
    debris = [r for r in rows if r["class_index"] == 2]
    muscle = [r for r in rows if r["class_index"] == 5]
    assert sorted((r["index"], r["attempt"], r["accepted"]) for r in debris) == [(i, 1, 1) for i in range(3)]
    assert sorted((r["index"], r["attempt"], r["accepted"]) for r in muscle) == \
        [(i, a, 0) for i in range(3) for a in (1, 2)]
    assert all(r["predicted_index"] == 2 for r in rows)
    assert len({r["seed"] for r in rows}) == len(rows)
    assert sorted(f for f in files_of(str(tmp_path)) if not f.startswith("rejected")) == \
        [image_file("debris", i) for i in range(3)]


def test_manifest_replay_and_resume(tiny, tmp_path):
    """A run with retries: every kept image's file is classified as its class; the manifest reloads;
    replaying a row gives its image bit for bit; a run crashed between batches and resumed from its
    manifest ends with exactly the same files and rows."""
    _, pipe, clf = tiny
    first = str(tmp_path / "first")
    rows, s = run_loop(pipe, clf, first, per_class=3, max_attempts=3)
    assert max(r["attempt"] for r in rows) >= 2, "the fixture validator should force retries"
    assert {r["class_index"] for r in rows if r["accepted"]} == {2, 5}
    for r in rows:
        if r["accepted"]:
            p = classify_file(clf, os.path.join(first, r["file"]))
            assert r["predicted_index"] == r["class_index"] == int(p.argmax())
            assert abs(float(p[r["class_index"]]) - r["prob_prompted"]) < 1e-4  # batch of 1 vs B

    reloaded = read_manifest(first)
    assert [row_key(r) for r in reloaded] == sorted(row_key(r) for r in rows)
    by_key = {row_key(r): r for r in rows}
    for r in reloaded:
        mine = by_key[row_key(r)]
        for k in ("file", "class_name", "prompt", "seed", "predicted_index", "accepted"):
            assert r[k] == mine[k]
        assert abs(r["prob_prompted"] - mine["prob_prompted"]) < 1e-6

    late = next(r for r in reloaded if r["accepted"] and r["attempt"] >= 2)
    rejected = next(r for r in reloaded if not r["accepted"])
    for r, image in zip([late, rejected], replay(pipe, clf, reloaded, [late, rejected], s)):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(os.path.join(first, r["file"]))))

    second = str(tmp_path / "second")
    with pytest.raises(KeyboardInterrupt):
        run_loop(pipe, clf, second, per_class=3, max_attempts=3, crash_after=2)
    partial = read_manifest(second)
    assert 0 < len(partial) < len(rows)
    resumed, _ = run_loop(pipe, clf, second, rows=partial, per_class=3, max_attempts=3)
    assert files_of(second) == files_of(first)
    assert sorted((row_key(r), r["seed"], r["accepted"]) for r in resumed) == \
        sorted((row_key(r), r["seed"], r["accepted"]) for r in rows)


def test_early_rejection_saves_work_and_audit_shows_its_price(tiny, tmp_path):
    _, pipe, clf = tiny
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        rows, s = run_loop(pipe, clf, str(tmp_path / "early"), per_class=3, max_attempts=2,
                           early_reject_at=0.5, early_reject_confidence=0.6)
    finally:
        hook.remove()
    c = costs(rows, s)
    assert c["early_dropped"] > 0 and c["unet_evals_saved"] > 0
    assert sum(calls) == c["unet_evals"]  # counted by the hook; CFG: 2 per image-step
    for r in rows:
        if r["accepted"]:  # the full check on the final image, whatever the early one said
            assert r["early_dropped"] == 0
            assert int(classify_file(clf, os.path.join(tmp_path / "early", r["file"])).argmax()) == r["class_index"]

    # One attempt each, so both runs make the very same batches.
    audit, sa = run_loop(pipe, clf, str(tmp_path / "audit"), per_class=4, max_attempts=1,
                         early_reject_at=0.5, early_reject_confidence=0.6, audit_early_reject=True)
    plain, _ = run_loop(pipe, clf, str(tmp_path / "plain"), per_class=4, max_attempts=1)
    plain = {row_key(r): r for r in plain}
    dropped = [r for r in audit if r["early_dropped"] == 1]
    assert dropped and all(r["accepted"] == 0 for r in dropped)
    for r in dropped:
        p = plain[row_key(r)]
        assert p["seed"] == r["seed"]
        a = np.asarray(Image.open(tmp_path / "audit" / r["file"]))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "plain" / p["file"])))
    would_pass = sum(plain[row_key(r)]["accepted"] for r in dropped)
    assert costs(audit, sa)["early_dropped_that_would_have_passed"] == would_pass
    assert sum(r["accepted"] for r in audit) + would_pass == sum(r["accepted"] for r in plain.values())


def cli(args, cwd, torchrun=False):
    """sample_validated.py in one process, or two under torchrun; one thread per process either
    way (torchrun sets OMP_NUM_THREADS=1 for its ranks): float results depend on the thread count,
    so "1 or N processes give the same folder" holds at equal threads per process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [os.path.join(ROOT, "sample_validated.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_finishes_refuses_and_matches_torchrun(tiny, tmp_path):
    folder, _, clf = tiny
    clf_path = save(clf, str(tmp_path / "validator.safetensors"))
    args = ["--model", folder, "--classifier", clf_path, "--classes", "debris", "5", "--per-class", "3",
            "--max-attempts", "2", "--steps", "3", "--resolution", "32", "--batch-size", "2", "--device", "cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    r = cli(args + ["--out", one], str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = read_manifest(one)
    state = by_item(rows)
    short = {}
    for (c, i), attempts in state.items():
        assert sorted(attempts) == list(range(1, len(attempts) + 1))
        if not any(a["accepted"] for a in attempts.values()):
            assert len(attempts) == 2  # gave up exactly at --max-attempts
            short[PATHMNIST_CLASSES[c]] = short.get(PATHMNIST_CLASSES[c], 0) + 1
    run = json.load(open(os.path.join(one, "run.json")))
    assert run["hit_max_attempts"] == short and run["status"] == "complete"
    if short:
        assert "max-attempts" in r.stderr
    kept = {r["file"] for r in rows if r["accepted"]}
    assert set(files_of(one)) == kept | {"contact_sheet.png"}
    assert all(f.split("/")[0] in ("debris", "smooth_muscle") for f in kept)

    before = files_of(one)
    manifest_mtime = os.path.getmtime(os.path.join(one, "manifest.csv"))
    again = cli(args + ["--out", one], str(tmp_path))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert os.path.getmtime(os.path.join(one, "manifest.csv")) == manifest_mtime
    other = cli(args + ["--out", one, "--seed", "1"], str(tmp_path))
    assert other.returncode == 2 and other.stderr.startswith("error:") and other.stderr.count("\n") == 1
    assert "--overwrite" in other.stderr and files_of(one) == before

    r = cli(args + ["--out", two], str(tmp_path), torchrun=True)
    assert r.returncode == 0, r.stderr
    assert files_of(two) == files_of(one)
    with open(os.path.join(one, "manifest.csv"), "rb") as a, open(os.path.join(two, "manifest.csv"), "rb") as b:
        assert a.read() == b.read()
    assert json.load(open(os.path.join(two, "run.json")))["settings"] == run["settings"]
