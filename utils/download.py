"""Downloading the published checkpoints: resumable, md5-verified (also when found in the cache), with a
progress bar, once per machine or shared file system when several processes ask at the same time; and models
in the Hugging Face Hub layout."""

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock
from huggingface_hub import hf_hub_download
from tqdm import tqdm

from utils.cli import UserError
from utils.utils import atomic_path

PARENT_URL = "https://a3s.fi/swift/v1/AUTH_a235c0f452d648828f745589cde1219a/sync/sync_models"
# experiment id -> what it is and the md5 prefix of its checkpoint, as published in the original README
PUBLISHED_MODELS = {
    "23-12-23T18-33-57": {"what": "stage 2, LRS3", "md5": "4415276"},
    "24-01-02T10-00-53": {"what": "stage 2, VGGSound", "md5": "19592ed"},
    "24-01-04T16-39-21": {"what": "stage 2, AudioSet", "md5": "54037d2"},
    "24-01-22T20-34-52": {"what": "synchronizability, AudioSet", "md5": "b1cb346"},
    "23-12-22T16-04-18": {"what": "stage 1 feature extractors, LRS3", "md5": "20b6e55"},
    "23-12-22T16-10-50": {"what": "stage 1 feature extractors, VGGSound", "md5": "a9979df"},
    "23-12-22T16-13-38": {"what": "stage 1 feature extractors, AudioSet", "md5": "4a566f2"},
}
STAGE1_IDS = {"23-12-22T16-04-18", "23-12-22T16-10-50", "23-12-22T16-13-38"}


class DownloadError(RuntimeError, UserError):
    """A file that could not be fetched or failed its checksum."""


def published_urls(exp_name: str) -> dict[str, str]:
    """The config and checkpoint URLs of a published experiment, keyed by 'cfg' and 'ckpt'."""
    if exp_name not in PUBLISHED_MODELS:
        raise DownloadError(f"Unknown published experiment '{exp_name}'; known: {sorted(PUBLISHED_MODELS)}.")
    ckpt = "checkpoints/epoch_best.pt" if exp_name in STAGE1_IDS else f"{exp_name}.pt"
    return {"cfg": f"{PARENT_URL}/{exp_name}/cfg-{exp_name}.yaml", "ckpt": f"{PARENT_URL}/{exp_name}/{ckpt}"}


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download(
    url: str, path: str | Path, md5_prefix: str | None = None, timeout: float = 30.0, size: int | None = None,
    record_md5: bool = False,
) -> Path:  # fmt: skip
    """Fetches `url` to `path` unless it is there already; a file already there is verified like a new one.

    Bytes go to `path.part` first; an interrupted download resumes from there (HTTP Range) and the file
    appears under its final name only once complete (`size` bytes, if given) and, if `md5_prefix` is
    given, verified. `record_md5`, for a file without a published md5: its md5 is recorded in `<path>.md5`
    when downloaded and verified later; a file without that record is fetched again. Processes that fetch
    the same file at once (on one machine or a shared file system) take turns through `<path>.lock`: one
    downloads, the others then verify its file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part, record = path.with_name(path.name + ".part"), path.with_name(path.name + ".md5")
    with FileLock(path.with_name(path.name + ".lock")):
        if record_md5 and record.is_file():
            md5_prefix = record.read_text().strip()
        if path.is_file() and (md5_prefix or not record_md5):
            if md5_prefix and not md5sum(path).startswith(md5_prefix):
                raise DownloadError(f"{path} does not match its md5 ({md5_prefix}...): delete it to download it again.")
            return path
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # the server ignored the range: start over
                    have = 0
                total = int(response.headers.get("Content-Length", 0)) + have
                with (
                    open(part, "ab" if have else "wb") as f,
                    tqdm(total=total or None, initial=have, unit="B", unit_scale=True, desc=path.name) as bar,
                ):
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(
                f"Could not download {url} to {path} ({e}). If this machine is offline, fetch the file elsewhere "
                f"and place it at {path}{f' and its md5 in {record}' if record_md5 else ''}."
            ) from e
        if size is not None and part.stat().st_size != size:  # kept: a re-run resumes from it
            raise DownloadError(f"{url}: got {part.stat().st_size} bytes, expected {size}; re-run to resume")
        if md5_prefix is not None and not md5sum(part).startswith(md5_prefix):
            part.unlink()
            raise DownloadError(f"{url} downloaded to {part} does not match md5 {md5_prefix}...: deleted; try again.")
        part.replace(path)
        if record_md5 and not record.is_file():
            with atomic_path(record) as tmp:
                tmp.write_text(md5sum(path))
    return path


def get_published_model(exp_name: str, root: str | Path = "./logs/sync_models") -> tuple[Path, Path]:
    """Returns local (config, checkpoint) paths of a published experiment, downloading what is missing and
    verifying what is there: the checkpoint against its published md5, the config (whose md5 was not
    published) against the md5 recorded when it was downloaded. What the config may build is limited
    anyway, as for a checkpoint's config (`utils.config.check_targets`).

    The layout is the original's, that of the server below `PARENT_URL`: `<root>/<exp>/cfg-<exp>.yaml` and
    `<root>/<exp>/<exp>.pt` (stage 1: `<root>/<exp>/checkpoints/epoch_best.pt`)."""
    urls = published_urls(exp_name)
    local = {k: Path(root) / url.removeprefix(f"{PARENT_URL}/") for k, url in urls.items()}
    cfg_path = download(urls["cfg"], local["cfg"], record_md5=True)
    ckpt_path = download(urls["ckpt"], local["ckpt"], md5_prefix=PUBLISHED_MODELS[exp_name]["md5"])
    return cfg_path, ckpt_path


HUB_FILES = ("config.json", "model.safetensors")  # what `Synchformer.save_pretrained` writes


def hub_weights(repo_id_or_folder: str | Path, revision: str | None = None) -> Path:
    """The `model.safetensors` of a folder in the Hub layout (with its `config.json` beside it), or of a Hugging
    Face Hub model id, downloaded into the Hub's cache (`HF_HOME`) unless it is there."""
    folder = Path(repo_id_or_folder)
    if folder.is_dir():
        missing = [name for name in HUB_FILES if not (folder / name).is_file()]
        if missing:
            raise DownloadError(f"{folder} has no {' and no '.join(missing)}: pass a folder of save_pretrained")
        return folder / HUB_FILES[1]
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    # without a network, the Hub client retries five times with a log line each: our one line says it all
    hub_logger.setLevel(logging.ERROR)
    try:
        paths = [hf_hub_download(str(repo_id_or_folder), name, revision=revision) for name in HUB_FILES]
    except (OSError, ValueError) as e:  # offline, an unknown repository or file, a malformed id
        gist = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(
            f"Could not fetch the Hugging Face Hub model '{repo_id_or_folder}' ({gist}). Check the id and the "
            "network, or pass a local folder with config.json and model.safetensors."
        ) from e
    finally:
        hub_logger.setLevel(level)
    return Path(paths[1])
