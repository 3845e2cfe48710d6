"""Small helpers every part of the project uses: building objects from configs by dotted path, writing
result files, and the process setting that keeps CPU work from waiting on the kernel."""

import csv
import ctypes
import importlib
import inspect
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from utils.cli import UserError


class ConfigError(ValueError, UserError):
    """A malformed config file, an override that does not fit the config, or a `target` that cannot be built
    from its `params` (imported from `utils.config`, its home; defined here, where objects are built)."""


def get_obj_from_str(string: str) -> Any:
    """Returns the object named by a dotted path, e.g. 'torch.nn.Linear' -> the Linear class."""
    if "." not in string:
        raise ImportError(f"'{string}' names no module")
    module_name, attr = string.rsplit(".", 1)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"Module '{module_name}' has no attribute '{attr}' (from target '{string}')") from e


def instantiate_from_config(config: Mapping) -> Any:
    """Builds `config['target'](**config['params'])`; `params` is optional and arrives as plain dicts and lists."""
    if "target" not in config:
        raise KeyError(f"Expected the key 'target' to instantiate an object, got keys {list(config)}")
    params = config.get("params", dict())
    if isinstance(params, DictConfig):
        # plain containers: OmegaConf's are slow to read in hot paths (e.g. `torch.as_tensor(ListConfig)`)
        params = OmegaConf.to_container(params, resolve=True)
    try:
        target = get_obj_from_str(config["target"])
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and not config["target"].startswith(f"{e.name}."):
            raise  # a dependency of the target's module is missing, the target itself is fine
        raise ConfigError(f"Cannot build the config's target: {e}. Check its `target:` spelling.") from e
    try:
        signature = inspect.signature(target)
    except ValueError:  # no signature to check (a builtin): the call below tells
        signature = None
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as e:
            unknown = [k for k in params if k not in signature.parameters]
            problem = f"it takes no {unknown}" if unknown else str(e)
            raise ConfigError(f"The params of {config['target']} do not fit it: {problem}. Check the config.") from e
    try:
        return target(**params)
    except ConfigError as e:  # an argument its constructor refused; each enclosing target adds its name
        raise ConfigError(f"{config['target']}: {e}") from e


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name next to `path` (its parent folders created) for the block to write; renamed to
    `path` when the block completes, so that a reader never sees half a file, and removed when it fails.
    It ends in `path`'s suffix: muxers and savefig pick the format by it; a long name is cut short in it,
    so that a name that fits the file system gets a temporary name that fits too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name.encode()[:200].decode(errors='ignore')}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Writes `obj` as indented JSON, creating the parent folders; atomic (a temporary name, then renamed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def write_csv(path: str | Path, rows: Sequence[Mapping], fieldnames: Sequence[str] | None = None) -> None:
    """Writes dicts as CSV rows under a header of `fieldnames` (default: the first row's keys); atomic."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def reuse_freed_memory() -> bool:
    """Lets glibc keep freed blocks of up to 1 GiB in the heap for the next allocation, instead of
    unmapping each block above 32 MiB on free and mapping a fresh one on the next request. The kernel
    zero-fills every freshly mapped page when it is first touched: the full model's activations are such
    blocks, and on a CPU forward those page faults (3.7 million per 8 video segments) cost a fifth of the
    time. Results are unchanged; the process holds on to up to 1 GiB of freed memory. Returns whether
    the setting took (it needs glibc, i.e. Linux; elsewhere this does nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
    # both are needed: without the trim threshold, the top of the heap is handed back on free
    return all(libc.mallopt(param, 1 << 30) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


class UnsafeNameError(ValueError, UserError):
    """A name from untrusted data (a CSV cell, a file name, an id) that would lead out of its folder."""


def safe_child(root: str | Path, name: str, allow_links_out: bool = False) -> Path:
    """`root / name` for a `name` that comes from data, so that whatever is written there stays under `root`.
    Refused with `UnsafeNameError` when `name` is empty, absolute, has a `..` part, or leads out of `root`
    through a symlink (under `root`, or `root` itself linking elsewhere is fine). `allow_links_out=True` skips
    that last check, for reading: a dataset folder of links to videos stored elsewhere is common."""
    path, parts = Path(root) / name, Path(name).parts
    problem = (
        "it is empty" if not parts or "\0" in name
        else "it is absolute" if Path(name).is_absolute()
        else "it climbs out with '..'" if ".." in parts
        else None if allow_links_out or path.resolve().is_relative_to(Path(root).resolve())
        else "it leads out through a symlink"
    )  # fmt: skip
    if problem:
        raise UnsafeNameError(f"{name!r} is not a name inside {root}: {problem} (use a relative path under it)")
    return path
