"""Worker for test_lm_ddp: two gloo ranks call the LM trainer's gradient reduction on rank-dependent
gradients; each writes the gradients it ends with to OUT_DIR/grads<rank>.pt. Usage: python ddp_average_worker.py OUT_DIR"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anchoring.kinds.lm.training import _average_gradients


def rank_main(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
        for i, p in enumerate(model.parameters()):  # rank r holds (r + 1)·(i + 1) everywhere
            p.grad = torch.full_like(p, float((rank + 1) * (i + 1)))
        _average_gradients(model, world)
        torch.save([p.grad for p in model.parameters()], Path(out) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    mp.spawn(rank_main, args=(2, str(Path(out) / "store"), out), nprocs=2)
