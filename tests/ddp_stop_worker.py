"""Worker for test_lm_ddp: two gloo ranks train a toy task through `fit`; SIGTERM reaches rank 1 only.
Each rank writes "stopped STEP SAVED_STEP" or "finished" to OUT_DIR/result<rank>.txt. Usage: python ddp_stop_worker.py OUT_DIR"""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from anchoring.train.checkpoint import read_checkpoint
from anchoring.train.skeleton import TrainingInterrupted, fit


class Task:
    """Two ranks averaging a gradient; rank 1 alone gets SIGTERM during step 3."""
    metric_names = ["loss"]

    def __init__(self, rank, world):
        self.rank, self.world, self.steps = rank, world, 50
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.params = {"w": self.w}
        self.optimizer = torch.optim.Adam([self.w], lr=0.1)

    def lr(self, step):
        return 0.1

    def step(self, step):
        if self.rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        self.optimizer.zero_grad()
        loss = ((self.w - 1) ** 2).sum()
        loss.backward()
        dist.all_reduce(self.w.grad)
        self.w.grad /= self.world
        self.optimizer.step()
        return loss.detach()[None]

    def after_step(self, step):
        return False

    def state(self, steps_done):
        return {}

    def restore(self, steps_done, tensors):
        pass


def rank_main(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    path = Path(out) / f"rank{rank}.safetensors"
    try:
        fit(Task(rank, world), checkpoint=path, every=1000)
        result = "finished"
    except TrainingInterrupted as e:
        result = f"stopped {e.step} {read_checkpoint(path)[0]}"
    finally:
        dist.destroy_process_group()
    (Path(out) / f"result{rank}.txt").write_text(result)


if __name__ == "__main__":
    import torch.multiprocessing as mp
    out = sys.argv[1]
    mp.spawn(rank_main, args=(2, os.path.join(out, "store"), out), nprocs=2, join=True)
