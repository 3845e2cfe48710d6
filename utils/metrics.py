"""Evaluation metrics: offset classification (stage 2), synchronizability (binary) and the zero-shot
shifted-window offset accuracy of the contrastive pre-training (stage 1)."""

import logging
import math
from statistics import NormalDist

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score


def topk_accuracy(targets: torch.Tensor, logits: torch.Tensor, k: int, tol: int = 0) -> float:
    """Share of items whose target (or a class within `tol` of it, offset classes being ordered) is in
    the top-k predictions."""
    N, C = logits.shape
    topk = logits.topk(min(k, C), dim=1).indices  # (N, k)
    dist = (topk - targets.view(N, 1)).abs()  # (N, k)
    return (dist <= tol).any(dim=1).float().mean().item()


def classification_metrics(targets: torch.Tensor, logits: torch.Tensor, topk=(1, 5), tol: int = 1) -> dict:
    """Metrics of a classifier from its logits (N, C) and integer targets (N,).

    Offset classes are ordered in time, so accuracy with a tolerance of one class is also reported
    (`accuracy_{k}_tol1`). For a binary task (synchronizability) top-k and tolerance make no sense and
    only top-1 accuracy is given. mAP, mROCAUC (one-vs-rest, averaged over classes) and d-prime need every
    class among the targets; otherwise they get the neutral values 0, 0.5, 0 (as in the original)."""
    targets, logits = targets.long().cpu(), logits.float().cpu()
    N, C = logits.shape
    if C == 2:
        metrics = {"accuracy_1": topk_accuracy(targets, logits, 1)}
    else:
        ks = sorted({min(k, C) for k in topk})
        metrics = {f"accuracy_{k}": topk_accuracy(targets, logits, k) for k in ks}
        metrics |= {f"accuracy_{k}_tol{tol}": topk_accuracy(targets, logits, k, tol) for k in ks}

    if len(targets.unique()) < C:
        logging.warning(f"Only {len(targets.unique())} of {C} classes occur in the targets: mAP/mROCAUC/dprime unset")
        return metrics | {"mAP": 0.0, "mROCAUC": 0.5, "dprime": 0.0}
    probs = logits.softmax(dim=1).numpy()
    targets_1hot = torch.nn.functional.one_hot(targets, C).numpy()
    mAP = np.mean([average_precision_score(targets_1hot[:, c], probs[:, c]) for c in range(C)])
    mROCAUC = np.mean([roc_auc_score(targets_1hot[:, c], probs[:, c]) for c in range(C)])
    # d' of two equal-variance Gaussians whose separation gives this ROC AUC
    dprime = NormalDist().inv_cdf(min(max(mROCAUC, 1e-12), 1 - 1e-12)) * math.sqrt(2)
    return metrics | {"mAP": float(mAP), "mROCAUC": float(mROCAUC), "dprime": dprime}


def shifted_window_accuracy(afeat: torch.Tensor, vfeat: torch.Tensor, win_size: int) -> dict:
    """Zero-shot offset accuracy of segment features (B, S, D) from an in-sync clip.

    Every window of `win_size` consecutive audio segments is compared with every window of visual
    segments (dot product of the concatenated features). A window is matched right when its most similar
    window of the other modality sits at the same position. Returns per-clip shares (B,) of right matches
    when picking the best audio window for each visual one ('precision_a'), the best visual window for
    each audio one ('precision_v'), and their mean ('precision')."""
    B, S, D = afeat.shape
    if not 0 < win_size < S:
        raise ValueError(f"The window ({win_size} segments) must be shorter than the clip ({S} segments).")
    a_win = afeat.unfold(1, win_size, 1).reshape(B, S - win_size + 1, D * win_size)  # (B, n_shifts, D*W)
    v_win = vfeat.unfold(1, win_size, 1).reshape(B, S - win_size + 1, D * win_size)  # (B, n_shifts, D*W)
    sim = a_win @ v_win.mT  # (B, n_shifts, n_shifts): audio windows in rows, visual in columns
    gt = torch.arange(sim.shape[-1], device=sim.device)  # (n_shifts,)
    precision_a = (sim.argmax(dim=-2) == gt).float().mean(dim=-1)  # (B,)
    precision_v = (sim.argmax(dim=-1) == gt).float().mean(dim=-1)  # (B,)
    return {"precision_a": precision_a, "precision_v": precision_v, "precision": (precision_a + precision_v) / 2}
