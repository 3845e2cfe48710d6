"""Symmetric contrastive (InfoNCE) loss between visual and audio features of the same segments.

Row i of the visual and of the audio features come from the same segment (a positive pair); every other
row of the batch, on every rank when gathered, is a negative."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils.dist import is_distributed


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the gradient of its own rows, summed over the
    losses of all ranks (every rank's loss uses every rank's rows as negatives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world_size * N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        N = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * N : (dist.get_rank() + 1) * N]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates `x` (same shape on every rank) from all ranks in rank order; gradients flow back to each rank."""
    return _GatherWithGrad.apply(x) if is_distributed() and dist.get_world_size() > 1 else x


def contrastive_loss(
    vfeat: torch.Tensor, afeat: torch.Tensor, temperature: torch.Tensor | float, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the visual->audio and audio->visual cross-entropies over cosine similarities / temperature.

    vfeat, afeat: (N, D), L2-normalised. With `gather`, negatives come from all ranks' batches (the
    local rows are the queries). Returns (loss, similarities v2a (N, N * world_size))."""
    N = vfeat.shape[0]
    rank = dist.get_rank() if gather and is_distributed() else 0
    vfeat_all, afeat_all = (gather_with_grad(vfeat), gather_with_grad(afeat)) if gather else (vfeat, afeat)
    sim_v2a = vfeat @ afeat_all.T / temperature  # (N, N_all)
    sim_a2v = afeat @ vfeat_all.T / temperature  # (N, N_all)
    # the positive of local row i sits where this rank's rows start in the gathered batch
    targets = torch.arange(N, device=vfeat.device) + rank * N
    loss = (F.cross_entropy(sim_v2a, targets) + F.cross_entropy(sim_a2v, targets)) / 2
    return loss, sim_v2a
