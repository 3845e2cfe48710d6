"""Resumable outputs: a log of finished items, one JSON line each, headed by what produced them.

    log = ResultLog(path, provenance, option="--out")  # another provenance: one-line UserError, file untouched
    log.records                                        # {key: record} of the intact lines, in order
    log.append(key, record)                            # one line, flushed to disk before the next item

The first line is `{"provenance": {...}}`: everything that changes the numbers (model checksum, precision,
protocol, settings), built by the command. A rerun with another provenance is refused, naming the keys
that differ and the fix, so old results are never relabelled with new settings. Every later line is
`{"key": ..., "record": ...}`. A line counts only when it is a complete JSON object ending in a newline;
the first one that is not (the tail of a process killed mid-write, or of a full disk) is cut off with
everything after it, so its item is done again and a new line is never glued onto a torn one.

`writing(path, option)` turns a failure to write (read-only folder, disk full, a file where a folder
should be, a name too long) into one line naming the output, so that it is not blamed on an input;
`output_folder` makes that check for a whole folder before any work starts."""

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.cli import UserError


class OutputError(UserError):
    """An output that cannot be written: the run stops, since every later item would fail the same way."""


@contextmanager
def writing(path: str | Path, option: str) -> Iterator[None]:
    """Turns an `OSError` of the block into an `OutputError` naming `path` and the command-line `option`."""
    try:
        yield
    except OSError as e:
        fix = f"free space, make it writable, or choose another {option}"
        raise OutputError(f"cannot write {path}: {e.strerror or e} ({fix})") from e


def output_folder(folder: str | Path, option: str) -> Path:
    """`folder`, created when missing, after writing and removing a probe file in it."""
    folder = Path(folder)
    with writing(folder, option):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    return folder


class ResultLog:
    """An append-only JSON-lines log of finished items that knows what produced it (see the module's doc)."""

    def __init__(self, path: str | Path, provenance: dict, option: str):
        self.path, self.option = Path(path), option
        self.provenance = json.loads(json.dumps(provenance))  # as it reads back (tuples become lists)
        self.records: dict = {}
        data = self.path.read_bytes() if self.path.is_file() else b""
        end = self._read(data)
        with writing(self.path, option):
            if end == 0:  # new, empty, or its header line was torn
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write(json.dumps({"provenance": self.provenance}) + "\n", mode="w")
            elif end < len(data):
                logging.warning(f"{self.path}: dropped a torn last record ({len(data) - end} bytes): it is redone")
                os.truncate(self.path, end)

    def _read(self, data: bytes) -> int:
        """Fills `records` from the intact lines of `data`; returns where they end (0: no header)."""
        end = 0
        for line in data.split(b"\n")[:-1]:  # the piece after the last newline is torn (or empty)
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if not isinstance(entry, dict):
                break
            if end == 0:
                if "provenance" not in entry:
                    raise UserError(f"{self.path}: not a results log of this command; move it away")
                self._check(entry["provenance"])
            elif entry.keys() == {"key", "record"}:
                self.records[entry["key"]] = entry["record"]
            else:
                break
            end += len(line) + 1
        return end

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
        """Adds `record` as `key`'s result (a later line replaces an earlier one of the same key)."""
        size = self.path.stat().st_size
        with writing(self.path, self.option):
            try:
                self._write(json.dumps({"key": key, "record": record}) + "\n")
            except OSError:
                os.truncate(self.path, size)  # no torn line left behind, when the disk allows it
                raise
        self.records[key] = record
