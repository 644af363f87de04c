"""Work for the ranks of a two-process test (torch.multiprocessing spawns them): kept apart from the test modules so
that a rank imports only torch, timm and effnet.models, not the test module's imports (seconds each)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d

from effnet import models


def sync_bn(rank: int, tmp: str) -> None:
    """`models.SyncBatchNormAct2d` on this rank's part of a batch (2 + 4 images) against BatchNormAct2d on the whole
    batch: the largest differences of outputs, input and parameter gradients (summed over ranks, as DDP's
    average would be scaled) and running statistics, saved to TMP/rank<N>.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(6, 5, 4, 4, generator=g), torch.randn(6, 5, 4, 4, generator=g)
        whole = BatchNormAct2d(5, momentum=0.1)
        torch.nn.init.uniform_(whole.weight, generator=g)
        torch.nn.init.uniform_(whole.bias, generator=g)
        sync = copy.deepcopy(whole)
        sync.__class__ = models.SyncBatchNormAct2d
        xs = x.clone().requires_grad_()
        ys = whole(xs)
        (ys * w).sum().backward()
        part = slice(0, 2) if rank == 0 else slice(2, 6)
        xp = x[part].clone().requires_grad_()
        yp = sync(xp)
        (yp * w[part]).sum().backward()
        grads = [p.grad.clone() for p in sync.parameters()]
        for t in grads:
            dist.all_reduce(t)
        torch.save({"y": (yp - ys[part]).abs().max().item(), "x_grad": (xp.grad - xs.grad[part]).abs().max().item(),
                    "param_grad": max((a - p.grad).abs().max().item() for a, p in zip(grads, whole.parameters())),
                    "mean": (sync.running_mean - whole.running_mean).abs().max().item(),
                    "var": (sync.running_var - whole.running_var).abs().max().item()}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
