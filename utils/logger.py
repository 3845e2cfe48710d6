"""Run logging: Python logging to the console and `<run_dir>/train.log`, per-epoch metrics to
`<run_dir>/metrics.jsonl` (and to Weights & Biases when `logging.use_wandb`), their learning curves
`<run_dir>/curves.png` (`logging.plot_curves`), a copy of the resolved config and, optionally, a
snapshot of the code. Only rank 0 writes files; other ranks log warnings only."""

import fnmatch
import json
import logging
import sys
import tarfile
import time
from pathlib import Path

import matplotlib
import torch
from omegaconf import DictConfig, OmegaConf

from utils.config import cfg_get, curr_time_with_random_shift
from utils.utils import atomic_path

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402

CURVES_EVERY_SEC = 60  # redraw a run's curves.png at most this often (and when it ends): tiny epochs are faster


def setup_logging(run_dir: Path | None, rank: int = 0) -> None:
    """Console logging on every rank (rank > 0: warnings only) and, on rank 0, appending to train.log."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log", mode="a"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s @ {rank} | %(levelname)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=handlers,
        force=True,  # replaces (and closes) the handlers of an earlier call
    )
    logging.getLogger("transformers").setLevel(logging.WARNING)  # too chatty at INFO


def snapshot_code(src: Path, dst: Path, patterns_to_ignore: list[str]) -> None:
    """Writes a tarball of the code in `src` (minus the ignored patterns) to `dst`, once per run."""
    if dst.exists():
        return

    def keep(info: tarfile.TarInfo):
        return None if any(fnmatch.fnmatch(Path(info.name).name, p) for p in patterns_to_ignore) else info

    with atomic_path(dst) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname=src.name, filter=keep)


class RunLogger:
    """Writes what a run reports; a silent stand-in on ranks other than 0."""

    def __init__(self, cfg: DictConfig, run_dir: Path, is_main: bool, resume: bool):
        self.run_dir = run_dir
        self.is_main = is_main
        self.wandb_run = None
        self.curves = run_dir / "curves.png" if is_main and cfg_get(cfg, "logging.plot_curves") else None
        self.curves_drawn_at = time.monotonic()
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # a resumed (or tested) run keeps its first config and adds one named by the current time
        cfg_path = run_dir / f"cfg-{cfg.start_time}.yaml"
        if cfg_path.exists():
            cfg_path = run_dir / f"cfg-{cfg.start_time}-{curr_time_with_random_shift()}.yaml"
        OmegaConf.save(cfg, cfg_path)
        if cfg_get(cfg, "logging.log_code_state"):
            patterns = list(cfg.logging.get("patterns_to_ignore", []))
            snapshot_code(Path.cwd(), run_dir / f"code-{cfg.start_time}.tar.gz", patterns)
        if cfg_get(cfg, "logging.use_wandb"):
            import wandb

            # never prompt for a login; offline unless the config asks for more. The run id is the start
            # time, so a resumed run continues the same wandb run.
            self.wandb_run = wandb.init(
                project=f"avsync-{cfg.action}", name=cfg.start_time, id=cfg.start_time, dir=str(run_dir),
                mode=cfg_get(cfg, "logging.wandb_mode"), config=OmegaConf.to_container(cfg, resolve=True),
                resume="allow" if resume else None, settings=wandb.Settings(silent=True),
            )  # fmt: skip

    def log_metrics(self, phase: str, epoch: int, metrics: dict) -> None:
        if not self.is_main:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        logging.info(f"{phase} ({epoch}): " + " ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"phase": phase, "epoch": epoch, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{phase}/{k}": v for k, v in metrics.items()} | {"epoch": epoch})
        if self.curves is not None and time.monotonic() - self.curves_drawn_at >= CURVES_EVERY_SEC:
            self.draw_curves()

    def draw_curves(self) -> None:
        plot_learning_curves({self.run_dir.name: self.run_dir}, self.curves)
        self.curves_drawn_at = time.monotonic()

    def finish(self) -> None:
        if self.curves is not None:
            self.draw_curves()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir: str | Path, phase: str | None = None) -> list[dict]:
    """The metrics a run logged (one dict per phase and epoch), optionally of one phase."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    return [r for r in records if phase is None or r["phase"] == phase]


def segment_similarities(v: torch.Tensor, a: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> dict:
    """Cross- and self-similarities (N, N) of N segments' L2-normalised visual `v` and audio `a` features
    (N, D), divided by `temperature`."""
    return {"v2a": v @ a.T / temperature, "a2v": a @ v.T / temperature, "v2v": v @ v.T / temperature,
            "a2a": a @ a.T / temperature}  # fmt: skip


def save_similarity_matrices(sims: dict[str, torch.Tensor], path: Path) -> None:
    """Saves segment similarity matrices (B*S, B*S) side by side as a PNG, each row min-max scaled
    (some rows have far lower values than others)."""
    fig, axes = plt.subplots(1, len(sims), figsize=(5 * len(sims), 5))
    for ax, (name, sim) in zip(axes, sims.items()):
        sim = sim.float().cpu()
        lo, hi = sim.min(dim=1, keepdim=True).values, sim.max(dim=1, keepdim=True).values
        ax.imshow(((sim - lo) / (hi - lo).clamp_min(1e-12)).numpy())
        ax.set_title(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_learning_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """One panel per run from its metrics.jsonl: train loss and valid accuracy per epoch (offset runs:
    accuracy@1 and within one class; AVCLIP: the shifted-window precision). None if no run has trained."""
    curves = {name: read_metrics(run_dir) for name, run_dir in runs.items() if (run_dir / "metrics.jsonl").is_file()}
    curves = {name: records for name, records in curves.items() if any(r["phase"] == "train" for r in records)}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, records) in zip(axes[0], curves.items()):
        train = [r for r in records if r["phase"] == "train"]
        valid = [r for r in records if r["phase"] == "valid"]
        ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
        ax.set(xlabel="epoch", ylabel="train loss", title=name)
        acc = ax.twinx()  # accuracies in [0, 1] beside a loss on its own scale
        for key, style in (("accuracy_1", "-"), ("accuracy_1_tol1", "--"), ("precision", "-")):
            if valid and key in valid[0]:
                acc.plot([r["epoch"] for r in valid], [r[key] for r in valid], style, color="tab:orange",
                         label=f"valid {key}")  # fmt: skip
        acc.set(ylabel="valid accuracy", ylim=(0, 1))
        lines = ax.get_lines() + acc.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
