"""study.md, its plots and study.json, from the arms' files (model/study/tables.py says which).

    DOC.md            every table with the paper's figure beside ours, the directions checked, the arms
    DOC.json          every cell's value and the file and keys it was read from
    DOC/*.png         the curves, the loop costs, the confusion matrices
"""
import datetime
import os
import platform
import shutil
import subprocess

from model.io import write_json, write_text
from model.plots import bar_chart, line_plot
from model.io import read_json
from model.study.directions import directions
from model.study.run import ARM_JSON, ROOT, shell
from model.study.tables import tables


def _commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    commit = head.stdout.strip() or "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if dirty.stdout.strip() else "")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def markdown(table, out):
    lines = ["| " + " | ".join(table.head) + " |", "|" + "---|" * len(table.head)]
    lines += ["| " + " | ".join(c.render(out) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _number(cell, out):
    v = cell.value(out)
    if v is None and cell.text is not None:
        try:
            return float(cell.text.split()[0])
        except ValueError:
            return None
    return v


def _plot(table, out, folder):
    """The table's plot into folder/; -> its file name, or None."""
    spec = table.plot
    if not spec:
        return None
    path = os.path.join(folder, spec["file"])
    rows = table.rows[:spec.get("rows", len(table.rows))]
    if "bars" in spec:
        panels = {table.head[c]: [row[c].value(out) for row in rows] for c in spec["bars"]}
        bar_chart(path, panels, [row[0].render(out) for row in rows], title=table.title)
        return spec["file"]
    xs = spec.get("xs") or [_number(row[spec["x"]], out) for row in rows]
    series = {}
    for c in spec["y"]:
        pts = [(x, row[c].value(out)) for x, row in zip(xs, rows) if x is not None and row[c].value(out) is not None]
        series[table.head[c]] = ([x for x, _ in pts], [y for _, y in pts])
    line_plot(path, series, title=table.title, xlabel=spec.get("xlabel", ""))
    return spec["file"]


def _header(recipe, out, seconds, argv):
    minutes = sum(seconds.values()) / 60
    return [
        "# The four papers' experiments, in miniature", "",
        f"Made by `{shell(['evaluate.py', *argv])}` at commit {_commit()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Every number below is read from a file "
        f"an arm's script wrote into `{out}/`; rerunning the command resumes the arms and writes this page again.", "",
        f"**Wall time: {minutes:.1f} min** ({len(seconds)} arms, the sum of each arm's wall seconds in the session "
        f"that finished it) on {cpu_model()}, {os.cpu_count()} cores, no GPU.", "",
        f"Settings: {recipe.scale} study, preset {recipe.preset}, seed "
        f"{recipe.seed} (the headline arms also seed {recipe.seed + 1}), {recipe.steps} DDIM steps, CFG "
        f"{recipe.guidance:g}, {recipe.per_class} kept images per class asked of each loop arm within "
        f"{recipe.max_attempts} attempts; the full recipe is in `{out}/recipe.json`.", "",
        "Nothing here is selected on the test split: classifiers keep their best-validation epoch, and the "
        "test split is only scored (validator accuracy, Frechet distance, utility).", ""]


def write_study(recipe, out, doc, seconds, argv):
    """Write doc (markdown), its .json twin and its plots; -> doc."""
    folder = os.path.splitext(doc)[0]
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(folder)
    lines = _header(recipe, out, seconds, argv)
    lines += ["## Where the papers' direction was and was not reproduced", ""] + directions(recipe, out) + [""]
    records = []
    for t in tables(recipe):
        lines += [f"## {t.title}", "", markdown(t, out), "", f"- Paper: {t.paper}", f"- Scale: {t.scale}", ""]
        plot = _plot(t, out, folder)
        if plot:
            lines += [f"![{t.title}]({name}/{plot})", ""]
        if t.key == "per_class":
            for arm in ("000_base", "000_lora"):
                src = os.path.join(out, arm, "confusion.png")
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(folder, f"confusion_{arm}.png"))
                    lines += [f"![confusion matrix of {arm}]({name}/confusion_{arm}.png)", ""]
        records.append({"key": t.key, "title": t.title, "head": t.head,
                        "rows": [[c.record(out) for c in row] for row in t.rows]})
    lines += ["## The arms and their commands", "", "Each arm is a folder of `" + out + "/`; paste its commands "
              "to rerun it alone.", ""]
    for arm, s in seconds.items():
        done = read_json(os.path.join(out, arm, ARM_JSON), missing_ok=True) or {}
        lines += [f"- `{arm}` ({s / 60:.1f} min)", "", "  ```bash"]
        lines += [f"  {c or '# the study writes the cut data.npz (model/study/imbalance.py)'}"
                  for c in done.get("commands", [])] + ["  ```"]
    write_text(doc, "\n".join(lines) + "\n")
    write_json(folder + ".json", {"out": out, "commit": _commit(), "argv": argv, "wall_seconds": sum(seconds.values()),
                                  "arm_seconds": seconds, "tables": records})
    return doc

