"""A table cell of the study, and where its number comes from.

Every number of study.md is read from a file an arm's script wrote, never computed anew, so a
cell carries its source: the file (relative to OUT) and the key path inside it. A few cells are a
ratio or a difference of two such numbers, and carry both sources and the operation. study.json
stores every cell with its sources, so anyone (the tests do) can check study.md against the arms.
"""
import math
import os

from model.io import read_json

DASH = "—"  # the cell does not apply to this row (not "not measured": that is n/a)


def lookup(out, file, keys):
    """OUT/file's value at keys (dict keys or list indices); None where missing or not a finite number."""
    obj = read_json(os.path.join(out, file), missing_ok=True)
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return None
    number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return float(obj) if number and math.isfinite(obj) else None


OPS = {
    "ratio": lambda a, b: a / b if b else None,                 # e.g. UNet evaluations per kept image
    "points": lambda a, b: 100 * (a - b),                       # accuracy gain in percentage points
}


class Cell:
    """A number read from the arms (`file`, `keys`), or OPS[op] of two of them; or fixed text."""

    def __init__(self, fmt=".3f", file=None, keys=(), op=None, file2=None, keys2=(), text=None):
        self.fmt, self.text, self.op = fmt, text, op
        self.sources = [(file, list(keys))] + ([(file2, list(keys2))] if op else [])

    def value(self, out):
        if self.text is not None:
            return None
        values = [lookup(out, f, k) for f, k in self.sources]
        if any(v is None for v in values):
            return None
        return OPS[self.op](*values) if self.op else values[0]

    def render(self, out):
        if self.text is not None:
            return self.text
        v = self.value(out)
        return "n/a" if v is None else format(v, self.fmt)

    def record(self, out):
        """The cell for study.json: its value, format and sources."""
        if self.text is not None:
            return {"text": self.text}
        return {"value": self.value(out), "format": self.fmt, "op": self.op,
                "sources": [{"file": f, "keys": k} for f, k in self.sources]}


def text(s):
    return Cell(text=s)


def per_kept(arm, file, keys, fmt=".1f"):
    """run.json's `keys` divided by the acceptance's kept count in metrics.json."""
    return Cell(fmt, f"{arm}/{file}", keys, "ratio", f"{arm}/metrics.json", ["acceptance", "kept"])
