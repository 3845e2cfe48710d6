"""Metrics on known predictions, their gathering across 2 gloo processes, lr schedules, early stopping."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scripts.train_sync import gather_metrics
from scripts.train_utils import BadLossGuard, EarlyStopper, lr_factor_fn
from utils.metrics import classification_metrics, shifted_window_accuracy, topk_accuracy


def test_topk_accuracy_with_tolerance():
    # 3 items, 5 ordered classes; ranking of item 0: 4 > 3 > ..., item 1: 0 > 1 ..., item 2: 2 > 3 > 4
    logits = torch.tensor([[0.0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 4, 3, 2]])
    targets = torch.tensor([3, 0, 4])
    assert topk_accuracy(targets, logits, 1) == pytest.approx(1 / 3)  # item 1 only
    assert topk_accuracy(targets, logits, 2) == pytest.approx(2 / 3)  # + item 0 (3 is 2nd)
    assert topk_accuracy(targets, logits, 1, tol=1) == pytest.approx(2 / 3)  # + item 0 (4 is next to 3)
    assert topk_accuracy(targets, logits, 1, tol=2) == pytest.approx(1.0)  # + item 2 (2 is two from 4)


def test_binary_metrics_by_hand():
    # positive-class probabilities 0.9, 0.4, 0.6, 0.2 for targets 1, 1, 0, 0
    p = torch.tensor([0.9, 0.4, 0.6, 0.2])
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=1)  # softmax -> p
    m = classification_metrics(torch.tensor([1, 1, 0, 0]), logits)
    assert set(m) == {"accuracy_1", "mAP", "mROCAUC", "dprime"}
    assert m["accuracy_1"] == pytest.approx(0.5)
    # 3 of 4 (positive, negative) pairs ranked right, for either class
    assert m["mROCAUC"] == pytest.approx(0.75)
    # ranked: +, -, +, - -> AP = (1/1 + 2/3) / 2, the same for both classes
    assert m["mAP"] == pytest.approx(5 / 6)
    assert m["dprime"] == pytest.approx(0.6744897501960817 * math.sqrt(2))


def test_offset_metrics_names_and_missing_classes():
    logits = torch.eye(21)[torch.arange(21)] * 5  # perfect predictions, one item per class
    m = classification_metrics(torch.arange(21), logits)
    assert m["accuracy_1"] == m["accuracy_5"] == m["accuracy_1_tol1"] == m["accuracy_5_tol1"] == 1.0
    assert m["mAP"] == pytest.approx(1.0) and m["mROCAUC"] == pytest.approx(1.0) and m["dprime"] > 5
    # one class absent from the targets: the ranking metrics fall back to their neutral values
    m = classification_metrics(torch.arange(20), logits[:20])
    assert (m["mAP"], m["mROCAUC"], m["dprime"]) == (0.0, 0.5, 0.0)


def test_shifted_window_accuracy():
    B, S, D, W = 2, 6, 16, 3  # 4 windows per clip
    a = torch.nn.functional.normalize(torch.randn(B, S, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    right = shifted_window_accuracy(a, a.clone(), W)
    assert torch.equal(right["precision"], torch.ones(B))
    # visual features one segment late: 3 of the 4 windows find their copy one place off; only the
    # window without a copy can be matched right by chance
    late = shifted_window_accuracy(a, a.roll(1, dims=1), W)
    assert (late["precision_a"] <= 0.25).all() and (late["precision_v"] <= 0.25).all()
    with pytest.raises(ValueError, match="shorter than the clip"):
        shifted_window_accuracy(a, a, S)


def test_lr_schedules():
    f = lr_factor_fn("constant_with_warmup", warmup=100, total_steps=0)
    assert f(0) == pytest.approx(0.01) and f(50) == pytest.approx(0.01 + 0.99 * 0.5) and f(100) == f(10**6) == 1
    f = lr_factor_fn("cosine", warmup=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    f = lr_factor_fn("const-cooldown", warmup=0, total_steps=100, cooldown_steps=20, cooldown_end=0.1)
    assert f(79) == 1.0 and f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Unknown lr schedule"):
        lr_factor_fn("linear", 0, 0)


def test_early_stopper_state_round_trip():
    stopper = EarlyStopper(patience=2, to_max=True, metric_name="accuracy_1")
    assert stopper.update({"accuracy_1": 0.3}) and not stopper.update({"accuracy_1": 0.2})
    restored = EarlyStopper(patience=2, to_max=True, metric_name="accuracy_1")
    restored.load_state_dict(stopper.state_dict())
    assert not restored.update({"accuracy_1": 0.3}) and restored.triggered and restored.best == 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_on_rank(rank: int, port: int, logits, targets, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank r holds items r, r+2, ... in batches of 2: the metrics put the items of any split back in order
    idx = torch.arange(rank, len(targets), 2)
    kept = [(idx[i : i + 2], logits[idx[i : i + 2]], targets[idx[i : i + 2]]) for i in range(0, len(idx), 2)]
    loss_sum = float(rank + 1) * len(idx)  # rank 0 reports a mean loss of 1, rank 1 of 2
    queue.put((rank, gather_metrics(kept, loss_sum, len(idx), n_bad=rank)))
    dist.destroy_process_group()


def test_gather_metrics_across_two_processes():
    gen = torch.Generator().manual_seed(0)
    N, C = 41, 21
    targets = torch.arange(N) % C
    logits = torch.randn(N, C, generator=gen) + 3 * torch.nn.functional.one_hot(targets, C)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gather_on_rank, args=(r, port, logits, targets, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = classification_metrics(targets, logits)
    n0, n1 = len(range(0, N, 2)), len(range(1, N, 2))
    expected |= {"loss": (1 * n0 + 2 * n1) / N, "n_bad_samples": 1}
    assert results[0] == results[1]  # every rank computes the same numbers
    assert results[0] == pytest.approx(expected)


def test_bad_loss_guard_stops_after_consecutive_non_finite_losses():
    guard = BadLossGuard(max_steps=3)
    assert guard.check(True, "it 0") and not guard.check(False, "it 1") and not guard.check(False, "it 2")
    assert guard.check(True, "it 3")  # a finite loss resets the count
    assert not guard.check(False, "it 4") and not guard.check(False, "it 5")
    with pytest.raises(FloatingPointError, match="NaN/inf for 3 steps in a row"):
        guard.check(False, "it 6")
