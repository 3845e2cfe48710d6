"""Feature caches: segment features of many videos in safetensors shards, read back by memory mapping.

A cache folder (written by `scripts/extract_features.py`) holds
- `shard-00000.safetensors`, ...: the features of up to `shard_size` videos each, one tensor per stream
  (`visual`, and `audio` when extracted) with the segments of its videos one after another along dim 0, and
  the provenance (model, precision, duration, audio) in the file's metadata;
- `index.json`: `{"provenance": {...}, "videos": {name: {"shard": file, "rows": {"visual": [start, stop],
  ...}}}, "skipped": {name: reason}}`: where each video's segments are, and why the others are missing;
- `progress.jsonl`: the log of finished videos that an interrupted extraction resumes from.

    cache = FeatureCache("features/")
    cache["clip.mp4"]["visual"]  # (S, 8, 768) float32

`safetensors.safe_open` maps a shard into memory and reads only the rows asked for; a whole shard also
loads with `safetensors.torch.load_file`."""

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from utils.cli import UserError
from utils.resumable import ResultLog, writing
from utils.utils import atomic_path, write_json

INDEX, LOG = "index.json", "progress.jsonl"
SHARD = re.compile(r"shard-(\d+)\.safetensors")


class ShardWriter:
    """Writes finished videos' features `shard_size` videos to a shard. A video is logged as done in `log`
    only once its shard is on disk, so an interrupted run loses at most one shard's videos, which it redoes."""

    def __init__(self, folder: Path, log: ResultLog, shard_size: int):
        self.folder, self.log, self.shard_size = folder, log, shard_size
        # numbered after every shard in the folder: a killed run may have left a shard whose videos are
        # only partly logged, and the rows those videos point to must never be overwritten
        taken = [int(m[1]) for p in folder.iterdir() if (m := SHARD.fullmatch(p.name))]
        self.next_shard = max(taken, default=-1) + 1
        self.pending: list[tuple[str, dict[str, torch.Tensor]]] = []

    def add(self, name: str, features: dict[str, torch.Tensor]) -> None:
        """Queues a video's features ({stream: (S, t, D)}); writes a shard once `shard_size` are queued."""
        self.pending.append((name, features))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Writes the queued videos as one shard (atomically), then logs each of them as done."""
        if not self.pending:
            return
        shard = f"shard-{self.next_shard:05d}.safetensors"
        records, start = [], dict.fromkeys(self.pending[0][1], 0)
        for _, features in self.pending:
            stop = {key: start[key] + len(f) for key, f in features.items()}
            records.append({"shard": shard, "rows": {key: [start[key], stop[key]] for key in stop}})
            start = stop
        tensors = {key: torch.cat([f[key] for _, f in self.pending]) for key in start}  # (sum S, t, D)
        path = self.folder / shard
        with writing(path, "--out"), atomic_path(path) as tmp:
            # `save` rather than `save_file`, which makes files that only their owner can read
            tmp.write_bytes(save(tensors, metadata={"provenance": json.dumps(self.log.provenance)}))
        for (name, _), record in zip(self.pending, records):
            self.log.append(name, record)
        self.next_shard, self.pending = self.next_shard + 1, []


def write_index(folder: Path, log: ResultLog, skipped: list[tuple[str, str]]) -> tuple[dict, dict]:
    """Writes `index.json` (atomically) from the log and the videos `skipped` before extraction; returns
    its videos and skipped ones."""
    videos = {name: r for name, r in sorted(log.records.items()) if "skip" not in r}
    skipped = {name: r["skip"] for name, r in log.records.items() if "skip" in r} | dict(skipped)
    with writing(folder / INDEX, "--out"):
        write_json(
            folder / INDEX, {"provenance": log.provenance, "videos": videos, "skipped": dict(sorted(skipped.items()))}
        )
    return videos, skipped


class FeatureCache(Mapping):
    """The videos of a cache folder by name: `cache[name]` -> {stream: (S, t, D)}, each stream's rows read
    from its memory-mapped shard. `provenance` says what made the features, `skipped` which videos are
    missing and why."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX
        try:
            index = json.loads(path.read_text())
            self.provenance, self.videos, self.skipped = index["provenance"], index["videos"], index["skipped"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path}: not a feature cache index ({e}); build one with scripts/extract_features.py"
            ) from e
        self._shards = {}

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.videos[name]
        shard = self._shard(entry["shard"])
        return {key: shard.get_slice(key)[start:stop] for key, (start, stop) in entry["rows"].items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.videos)

    def __len__(self) -> int:
        return len(self.videos)

    def _shard(self, name: str):
        if name not in self._shards:
            path = self.folder / Path(name).name  # an index names files in its own folder, never elsewhere
            if not path.is_file():
                raise UserError(
                    f"{path}: a shard named in {self.folder / INDEX} is missing; copy the whole cache folder"
                )
            self._shards[name] = safe_open(path, framework="pt")
        return self._shards[name]
