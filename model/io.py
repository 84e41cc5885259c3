"""Shared I/O for every script: one-line user errors, atomic writes, safe loading.

Two promises live here. (1) Bad input from the user is a `UserError`: `cli()` prints it as one
line on stderr and exits with code 2, no traceback. (2) Every output file is written to a temp
file in the same folder and then renamed over the target, so a kill at any moment leaves either
the old file or the new one, never a truncated one (rename is atomic on POSIX and Windows).
"""
import argparse
import csv
import hashlib
import io
import json
import os
import re
import socket
import sys
import tempfile

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A problem with what the user gave us (file, flag, data): shown as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse keeping the one-line promise: a bad flag (`--per-class abc`) prints `error: ...`
    without argparse's usage line, and exits with code 2. The docstring layout is kept in --help."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def cli(main):
    """Run `main()` as a script entry point: UserError -> one line on stderr and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: files written so far are complete; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


def check_out_dir(path, flag="--out"):
    """Fail now, before any work, if `path` cannot become a folder to write in: it is a file, or
    lies below one, or its nearest existing folder is not writable. Creates nothing."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{flag} {path}: exists and is not a folder")
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")


# Temp files are named .tmp-<host>-<pid>-<random>-<name>. A kill (SIGKILL, power loss) leaves the
# temp of the write in flight behind: the first write of a process into a folder removes the
# temps there whose writer was a process of this machine that no longer exists.
_HOST = hashlib.md5(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"\.tmp-([0-9a-f]{6})-(\d+)-")
_SWEPT = set()


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(folder):
    if folder in _SWEPT or os.name == "nt":  # (on Windows os.kill would terminate the process)
        return
    _SWEPT.add(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMP.match(name)
        if m and m.group(1) == _HOST and not _alive(int(m.group(2))):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file_object) on a temp file beside `path`, fsync, then rename over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temps(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{_HOST}-{os.getpid()}-",
                                   suffix="-" + os.path.basename(path))
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path, header, rows):
    def write(f):
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    atomic_write(path, write, mode="w")


def save_png(path, image):
    """Save a PIL image as PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def save_safetensors(path, tensors, metadata=None):
    """Save a dict of tensors as .safetensors atomically (metadata: str -> str)."""
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes(path, _sorted_header(save(tensors, metadata=meta)))


def _sorted_header(data):
    """safetensors writes the metadata in hash-map order, which changes from process to process:
    sort it, so that equal tensors and metadata always give equal bytes (a resumed run's files are
    then byte-identical to an uninterrupted run's). The header stays padded to 8 bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_torch(path, obj):
    """torch.save atomically (for resumable training state: tensors, numbers, strings only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def first_line(e):
    """The first line of an exception's message (at most 200 characters): the part a one-line
    error can carry."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def read_json(path, missing_ok=False, hint=""):
    """Parse a JSON file; None if it is absent and `missing_ok`, else UserError. An unreadable file
    is always a UserError (with `hint`, e.g. "; remove it or pass --overwrite")."""
    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise UserError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)}){hint}") from None


def load_torch(path, map_location="cpu"):
    """torch.load that never unpickles code: anything needing full pickle is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be loaded safely with weights_only=True "
                        f"(refusing full pickle): {first_line(e)}") from None


def read_safetensors(path, device="cpu"):
    """Read all tensors and the metadata of a .safetensors file; UserError if missing/corrupt."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a valid .safetensors file ({first_line(e)})") from None
    return tensors, meta
