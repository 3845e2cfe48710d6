import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.avclip_loss import contrastive_loss
from tests.reference_data import reference_arrays


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_loss_is_symmetric_cross_entropy_with_diagonal_positives():
    v, a = features(6)
    loss, sim = contrastive_loss(v, a, 0.07)
    eye = torch.eye(6)  # the original's probability targets
    expected = (F.cross_entropy(v @ a.T / 0.07, eye) + F.cross_entropy(a @ v.T / 0.07, eye)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sim, v @ a.T / 0.07)
    # aligned pairs score lower than shuffled ones
    assert contrastive_loss(v, v, 0.07)[0] < contrastive_loss(v, v.roll(1, dims=0), 0.07)[0]


def test_temperature_gets_gradient():
    v, a = features(4)
    scale = torch.tensor(0.07, requires_grad=True)
    contrastive_loss(v, a, scale)[0].backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


ROWS = (3, 5)  # rank 1 holds more rows than rank 0, as when rank 0 dropped a bad clip


def _gathered_rank(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    v_all, a_all = features(sum(ROWS))
    rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
    v, a = (x[rows].clone().requires_grad_() for x in (v_all, a_all))
    loss, sim = contrastive_loss(v, a, 0.1, gather=True)
    loss.backward()
    # numpy arrays travel by value: shared tensors would vanish when this process exits
    queue.put((rank, loss.item(), tuple(sim.shape), v.grad.numpy(), a.grad.numpy()))
    dist.destroy_process_group()


def test_gathered_loss_of_uneven_ranks_equals_the_concatenated_rows_loss():
    """2 ranks with 3 and 5 rows: each rank's loss is the loss of one process holding all 8 rows, and the
    gradients (as DDP averages them) match it, so negatives come from the other rank, positives sit at the right
    column, and the ranks' different row counts neither abort nor hang the gather."""
    world_size = len(ROWS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gathered_rank, args=(r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:  # the results are small: they fit the queue's pipe before anyone reads them
        p.join(timeout=120)
        assert p.exitcode == 0
    results = sorted((queue.get(timeout=10) for _ in procs), key=lambda r: r[0])

    v_all, a_all = (x.requires_grad_() for x in features(sum(ROWS)))
    full_loss, _ = contrastive_loss(v_all, a_all, 0.1)
    full_loss.backward()
    for rank, loss, sim_shape, v_grad, a_grad in results:
        assert loss == pytest.approx(full_loss.item(), abs=1e-6) and sim_shape == (8, 8)
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        torch.testing.assert_close(torch.from_numpy(v_grad) / world_size, v_all.grad[rows])
        torch.testing.assert_close(torch.from_numpy(a_grad) / world_size, a_all.grad[rows])


def test_loss_matches_original_on_its_features():
    ref = reference_arrays("parity_avclip")
    loss, sim = contrastive_loss(ref["vfeat"], ref["afeat"], ref["logit_scale"])
    assert (sim - ref["sim_v2a"]).abs().max() <= 1e-4
    assert (loss - ref["segment_contrastive_loss"]).abs() <= 1e-4
