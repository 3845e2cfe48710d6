"""Resumable outputs: a log of finished items, one JSON line each, headed by what produced them.

    log = ResultLog(path, provenance, option="--out")  # another provenance: one-line UserError, file untouched
    log.records                                        # {key: record} of the intact lines
    log.append(key, record)                            # one line, on disk before the next item

The first line is `{"provenance": {...}}`: what changes the numbers (model checksum, precision, protocol,
settings), built by the command; a rerun with another one is refused, naming the keys that differ, so old
results are never relabelled. Later lines are `{"key": ..., "record": ...}`. A line counts only when it is
a whole JSON object ending in a newline: the first that is not (a process killed mid-write, a full disk)
is cut off with all after it, so its item is done again and no line is glued onto a torn one.

`writing(path, option)` turns a failure to write (read-only folder, full disk, a file where a folder
should be) into one line naming the output, not an input; `output_folder` checks a folder up front."""

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from utils.cli import UserError


class OutputError(UserError):
    """An output that cannot be written: the run stops, as every later item would fail the same way."""


@contextmanager
def writing(path: str | Path, option: str):
    try:
        yield
    except OSError as e:
        fix = f"free space, make it writable, or choose another {option}"
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({fix})") from e


def output_folder(folder: str | Path, option: str) -> Path:
    """`folder`, created when missing, once a probe file could be written in it."""
    folder = Path(folder)
    with writing(folder, option):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".write-probe-{os.getpid()}").touch()
        (folder / f".write-probe-{os.getpid()}").unlink()
    return folder


class ResultLog:
    def __init__(self, path: str | Path, provenance: dict, option: str):
        self.path, self.option, self.records = Path(path), option, {}
        self.provenance = json.loads(json.dumps(provenance))  # as it reads back (tuples become lists)
        data = self.path.read_bytes() if self.path.is_file() else b""
        end = 0  # of the intact lines
        for line in data.split(b"\n")[:-1]:  # what follows the last newline is torn (or empty)
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if end == 0 and isinstance(entry, dict) and "provenance" in entry:
                self._check(entry["provenance"])
            elif end == 0:
                raise UserError(f"{self.path}: not a results log of this command; move it away")
            elif isinstance(entry, dict) and entry.keys() == {"key", "record"}:
                self.records[entry["key"]] = entry["record"]
            else:
                break
            end += len(line) + 1
        with writing(self.path, option):
            if end == 0:  # new, empty, or its header was torn
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write(json.dumps({"provenance": self.provenance}) + "\n", "w")
            elif end < len(data):
                logging.warning(f"{self.path}: dropped a torn last record ({len(data) - end} bytes): it is redone")
                os.truncate(self.path, end)

    def _check(self, old: dict) -> None:
        differ = sorted(k for k in old.keys() | self.provenance.keys() if old.get(k) != self.provenance.get(k))
        if differ:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in differ)
            raise UserError(
                f"{self.path} holds results made with {was}, not with this run's settings ({', '.join(differ)} "
                f"differ): rerun with those settings, or choose another {self.option} (or remove it to start over)"
            )

    def _write(self, text: str, mode: str = "a") -> None:
        with open(self.path, mode) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def append(self, key: str, record) -> None:
        """Logs `record` as `key`'s result (a later line replaces an earlier one of the same key)."""
        size = self.path.stat().st_size
        with writing(self.path, self.option):
            try:
                self._write(json.dumps({"key": key, "record": record}) + "\n")
            except OSError:
                os.truncate(self.path, size)  # no torn line left behind, when the disk allows it
                raise
        self.records[key] = record
