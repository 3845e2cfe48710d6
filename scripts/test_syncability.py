"""Evaluates a synchronizability model on the test split; optionally also how an offset model performs on
the clips that the synchronizability model deems synchronisable, across confidence thresholds.

    python -m scripts.test_syncability config_sync=<run>/cfg-<id>.yaml ckpt_path_sync=<run>/<id>_best.pt \\
        [config_off=<stage-2 cfg> ckpt_path_off=<stage-2 .pt>] [data.iter_times=25 ...overrides for both]

With an offset model, the inputs are made as long as the offset model needs (its `data.n_segments`) and
the synchronizability model sees the first of its own `data.n_segments`. Writes
`<logdir>/<start_time>/synchronizability_test.json`: the synchronizability metrics, its ROC curve and, per
threshold, the offset metrics on the kept clips (a clip kept although not synchronisable counts as wrong).
Runs under torchrun/srun like the trainers."""

import logging
import sys

import torch
from sklearn.metrics import roc_curve

from dataset.dataset_utils import get_datasets
from scripts.train_utils import build_loader, load_weights, mixed_precision, setup_run
from utils.cli import run_cli
from utils.config import ConfigError, load_config
from utils.dist import all_gather_objects, cleanup
from utils.metrics import classification_metrics
from utils.utils import instantiate_from_config, reuse_freed_memory, write_json

THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
OWN_KEYS = ("config_sync", "ckpt_path_sync", "config_off", "ckpt_path_off")


def set_n_segments(cfg, n_segments: int) -> None:
    """Makes the test transforms cut `n_segments` segments (the offset model's input length)."""
    for t in cfg.transform_sequence_test:
        if t.target.endswith(("TemporalCropAndOffsetForSyncabilityTraining", "GenerateMultipleSegments")):
            t.params.n_segments = n_segments


def offset_metrics_by_threshold(p_sync, sync_targets, off_logits, off_targets) -> dict:
    """Offset metrics on the clips whose synchronizability probability exceeds each threshold."""
    results = {}
    n_cls = off_logits.shape[1]
    for t in THRESHOLDS:
        kept = p_sync > t
        if not kept.any():
            results[t] = {"n_kept": 0}
            continue
        targets = off_targets[kept].clone()
        # a kept clip that is not synchronisable has no right offset: give it a target no prediction
        # (even with the ±1 tolerance) matches
        not_syncable = sync_targets[kept] == 0
        wrong_target = (off_logits[kept].argmax(dim=1) + 5) % n_cls
        targets[not_syncable] = wrong_target[not_syncable]
        results[t] = classification_metrics(targets, off_logits[kept]) | {"n_kept": int(kept.sum())}
    return results


def main(argv: list[str]) -> None:
    reuse_freed_memory()
    args = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in OWN_KEYS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in OWN_KEYS]
    if "config_sync" not in args or "ckpt_path_sync" not in args:
        raise ConfigError("Pass config_sync=<cfg.yaml> and ckpt_path_sync=<model.pt>.")
    if ("config_off" in args) != ("ckpt_path_off" in args):
        raise ConfigError("config_off and ckpt_path_off go together.")
    test_only = ["training.run_test_only=True", "training.resume=False", "training.finetune=False"]
    cfgs = {
        m: load_config([f"config={args[f'config_{m}']}", f"ckpt_path={args[f'ckpt_path_{m}']}", *overrides, *test_only])
        for m in ("sync", "off")
        if f"config_{m}" in args
    }
    cfg = cfgs["sync"]
    if "off" in cfgs:
        set_n_segments(cfg, cfgs["off"].data.n_segments)
        for name in ("afeat_extractor", "vfeat_extractor"):
            cfgs["off"].model.params[name].params.ckpt_path = None  # the weights come with the checkpoint

    env, run_dir, logger = setup_run(cfg)
    models = {m: instantiate_from_config(c.model).to(env.device).eval() for m, c in cfgs.items()}
    for m, c in cfgs.items():
        load_weights(models[m], c.ckpt_path, strict=True)

    loader = build_loader(cfg, get_datasets(cfg, ["test"])["test"], "test", env)
    autocast, _ = mixed_precision(cfg, env.device)
    n_seg_sync = cfg.data.n_segments  # the transforms may cut more, for the offset model
    outputs = []
    with torch.no_grad(), autocast():
        for batch in loader:
            if batch is None:
                continue
            vis, aud = batch["video"].to(env.device).float(), batch["audio"].to(env.device).float()
            out = {
                "index": batch["index"],
                "sync_logits": models["sync"](vis[:, :n_seg_sync], aud[:, :n_seg_sync])[1].float().cpu(),
                "sync_targets": batch["targets"]["sync_target"],
            }
            if "off" in models:
                out["off_logits"] = models["off"](vis, aud)[1].float().cpu()
                out["off_targets"] = batch["targets"]["offset_target"]
            outputs.append(out)
    shards = [o for rank_outputs in all_gather_objects(outputs) for o in rank_outputs]
    res = {k: torch.cat([o[k] for o in shards]) for k in shards[0]}
    order = res.pop("index").argsort()
    res = {k: v[order] for k, v in res.items()}

    if env.is_main:
        p_sync = res["sync_logits"].softmax(dim=1)[:, 1]
        fpr, tpr, thresholds = roc_curve(res["sync_targets"].numpy(), p_sync.numpy())
        report = {
            "sync": classification_metrics(res["sync_targets"], res["sync_logits"]),
            "roc_curve": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()},
        }
        logger.log_metrics("test_sync", 0, report["sync"])
        if "off" in models:
            by_t = offset_metrics_by_threshold(p_sync, res["sync_targets"], res["off_logits"], res["off_targets"])
            report["offset_by_threshold"] = {str(t): m for t, m in by_t.items()}
            for t, m in by_t.items():
                logging.info(f"offset metrics on clips with p(sync) > {t}: {m}")
        write_json(run_dir / "synchronizability_test.json", report)
    logger.finish()
    cleanup()


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
