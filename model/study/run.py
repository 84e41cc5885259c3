"""`evaluate.py study`: run every arm of the study, then write its tables.

Each arm's commands run as child processes of the scripts, exactly as printed (so a reader can
paste them). When an arm's commands all succeed the study writes OUT/<arm>/study_arm.json with the
commands and their wall seconds; a rerun skips an arm whose file names the same commands, and runs
the others again, where every script resumes or skips its own finished work. OUT/recipe.json holds
the recipe: a rerun into OUT with another recipe is refused, so numbers of two settings never mix.
"""
import dataclasses
import os
import runpy
import shlex
import subprocess
import sys
import time

from model.io import UserError, check_out_dir, read_json, write_json
from model.study.arms import plan
from model.study.imbalance import IMBALANCED_NPZ, write_imbalanced

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARM_JSON, RECIPE_JSON = "study_arm.json", "recipe.json"


def shell(cmd):
    """The command as a user types it from the repository root."""
    return " ".join(shlex.quote(c) for c in ["python", *cmd])


def _claim(out, recipe):
    """Write OUT/recipe.json, or refuse an OUT that holds a study with another one."""
    path = os.path.join(out, RECIPE_JSON)
    mine = dataclasses.asdict(recipe)
    old = read_json(path, missing_ok=True)
    if old and {k: (list(v) if isinstance(v, tuple) else v) for k, v in mine.items()} != old.get("recipe"):
        raise UserError(f"{out} holds a study with other settings ({path}): use another --out")
    if not old:
        write_json(path, {"recipe": mine})


def _in_process(cmd):
    """Run a script as `python script args` would, inside this process (no Python start-up per
    command: the tests' tiny study); -> its exit code."""
    argv = sys.argv
    sys.argv = list(cmd)
    try:
        runpy.run_path(os.path.join(ROOT, cmd[0]), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def _run_command(cmd, recipe, out, arm, in_process=False):
    if cmd is None:  # the one step that is not a script: 003's imbalanced copy of the data
        write_imbalanced(recipe.data, recipe.scarce_classes, recipe.scarce_n, recipe.seed,
                         os.path.join(out, arm.name, IMBALANCED_NPZ))
        return
    print(f"+ {shell(cmd)}", flush=True)
    code = _in_process(cmd) if in_process else subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode
    if code:
        raise UserError(f"arm {arm.name}: `{shell(cmd)}` exited with {code}; fix it and rerun the study "
                        f"(finished arms are kept)")


def run_arm(arm, recipe, out, in_process=False):
    """Run an arm's commands unless OUT/<arm>/study_arm.json says they all finished; -> its seconds."""
    marker = os.path.join(out, arm.name, ARM_JSON)
    listed = [None if c is None else shell(c) for c in arm.commands]
    done = read_json(marker, missing_ok=True)
    if done and done.get("commands") == listed:
        return done["seconds"]
    print(f"== arm {arm.name}", flush=True)
    start = time.time()
    for cmd in arm.commands:
        _run_command(cmd, recipe, out, arm, in_process)
    seconds = time.time() - start  # of the session that finished the arm
    write_json(marker, {"commands": listed, "seconds": seconds})
    return seconds


def run_study(recipe, out, only=None, in_process=False):
    """Run the arms (all, or those named in `only`), in plan order; -> {arm name: wall seconds}.
    in_process: run each script inside this process rather than as a child process."""
    arms = plan(recipe, out)
    names = [a.name for a in arms]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise UserError(f"--arms {unknown[0]}: not an arm of this study ({', '.join(names)})")
    check_out_dir(out)
    _claim(out, recipe)
    return {a.name: run_arm(a, recipe, out, in_process) for a in arms if not only or a.name in only}


def finished_arms(recipe, out):
    """{arm name: wall seconds} of the arms of the plan that finished with the plan's commands."""
    done = {}
    for arm in plan(recipe, out):
        marker = read_json(os.path.join(out, arm.name, ARM_JSON), missing_ok=True)
        if marker and marker.get("commands") == [None if c is None else shell(c) for c in arm.commands]:
            done[arm.name] = marker["seconds"]
    return done
