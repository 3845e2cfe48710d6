"""Symmetric contrastive (InfoNCE) loss between visual and audio features of the same segments.

Row i of the visual and of the audio features come from the same segment (a positive pair); every other
row of the batch, on every rank when gathered, is a negative."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from utils.dist import is_distributed


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates `x` (N, D) from all ranks in rank order, whose row counts may differ (a rank that dropped a bad
    clip has fewer); gradients flow back to each rank, summed over the losses of all ranks."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return x
    # every rank must send the same shape: pad to the largest row count, cut the padding off after
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    parts = all_gather(F.pad(x, (0, 0, 0, int(max(counts)) - len(x))))  # world_size x (N_max, D)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])  # (sum of N over ranks, D)


def contrastive_loss(
    vfeat: torch.Tensor, afeat: torch.Tensor, temperature: torch.Tensor | float, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the visual->audio and audio->visual cross-entropies over cosine similarities / temperature.

    vfeat, afeat: (N, D), L2-normalised. With `gather`, the rows of all ranks (their counts may differ) make
    one batch and every rank computes its loss: the loss on the concatenated rows (DDP's average of the ranks'
    gradients then is that loss's gradient). Returns (loss, similarities v2a (N_all, N_all))."""
    if gather:
        vfeat, afeat = gather_with_grad(vfeat), gather_with_grad(afeat)  # (N_all, D)
    sim_v2a = vfeat @ afeat.T / temperature  # (N_all, N_all)
    targets = torch.arange(len(vfeat), device=vfeat.device)
    loss = (F.cross_entropy(sim_v2a, targets) + F.cross_entropy(sim_v2a.T, targets)) / 2
    return loss, sim_v2a
