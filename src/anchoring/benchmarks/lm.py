"""LM training-step throughput: the project's step against a plain GPT-2-style baseline.

Size is nanoGPT's CPU recipe for Shakespeare characters: 4 layers × 4 heads × width 128, block 64,
batch 12. Both models get the same windows (the project's own stream over the training passages, drawn
inside the timed step for both, as a training loop does),
the same optimiser settings (Adam-family, lr 1e-3, betas of the config, no weight decay, foreach
implementation) and the same warm-up (the first `WARMUP` steps are not timed). The baseline is the
model a user would write by hand: learned positions, pre-LayerNorm, GELU MLP 4×, tied embeddings,
no hooks, no weight normalisation. The project's step adds what the method needs: the normalised
transformer (weights back on the sphere after every step) and, for the anchored case, the hooks and
the sequence terms of `lm-anchor` (its span labels included).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

WARMUP = 3
SIZE = ["lm.width=128", "lm.layers=4", "lm.heads=4", "lm.context=64", "lm.batch_size=12"]


class GPT2Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    """A plain GPT-2-style causal LM (nanoGPT's model without dropout)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(GPT2Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if n.endswith(("proj.weight", "out.weight")) else 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


SAME_SIZE = 344  # SwiGLU hidden units: 3 × 128 × 344 weights ≈ the GELU MLP 4×'s 2 × 128 × 512 (+0.8%)


def lm_step(which: str, steps: int, mlp_hidden: int = SAME_SIZE, compiled: bool = False, device: str = "cpu") -> dict:
    """tokens/s of one training step: `which` ∈ project | anchored | gpt2.

    The project's SwiGLU MLP has three matrices where the baseline's GELU MLP 4× has two, so 344
    hidden units (8/3 × 128, rounded up to a multiple of 8) give it the baseline's MLP size within
    1%; the LM default is 4 × width = 512 (half as large again). `compiled`: the baseline's model
    through `torch.compile`, the project's step with `train.compile = true`; the compilation happens
    in the untimed warm-up. `device="cuda"`: both models train on the GPU, both optimisers take their
    fused CUDA implementation (the project's step picks it there), and the clock stops only after
    the GPU has finished the timed steps."""
    from anchoring import experiments
    from anchoring.anchor import Capture
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.training import LMTask
    from anchoring.train.skeleton import flush_denormals

    arm = "anchored" if which == "anchored" else "control"
    cfg = experiments.load("lm-anchor", [*SIZE, f"lm.mlp_hidden={mlp_hidden}", f"train.steps={steps + WARMUP}", f'lm.arms=["{arm}"]',
                                         f"train.compile={str(compiled and which != 'gpt2').lower()}",
                                         f'train.device="{device}"'])  # gpt2: task for batches only
    data = load_data(cfg.text)
    task = LMTask(cfg, data, 0, arm)
    B, T = cfg.lm.batch_size, cfg.lm.tokens
    if which == "gpt2":
        torch.manual_seed(0)
        model = GPT2(data.vocab_size, cfg.lm.width, cfg.lm.layers, cfg.lm.heads, cfg.lm.context).to(task.device)
        impl = {k: task.optimizer.defaults[k] for k in ("fused", "foreach")}  # the project's optimiser's own choice
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=cfg.train.betas, weight_decay=0.0, **impl)
        forward = torch.compile(model) if compiled else model

        def one(step: int) -> None:
            b = task.stream.batch(step, B, task.labels, task.rows_of_rank)  # the project's step draws its batch too
            x, y = b.inputs.to(task.device), b.targets.to(task.device)
            loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        params = sum(p.numel() for p in model.parameters())
    else:
        for g in task.optimizer.param_groups:
            g["lr"] = 1e-3

        def one(step: int) -> None:
            task.step(step)

        params = sum(p.numel() for p in task.model.parameters())

    def sync() -> None:
        if task.device.type == "cuda":
            torch.cuda.synchronize(task.device)

    with Capture(task.model, [t.site.module for t in task.terms]) as cap, flush_denormals():
        task.cap = cap
        for s in range(WARMUP):
            one(s)
        sync()
        t0 = time.perf_counter()
        for s in range(WARMUP, WARMUP + steps):
            one(s)
        sync()
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "steps": steps, "tokens_per_s": steps * B * T / elapsed, "params": params,
            "vocab": data.vocab_size, "threads": torch.get_num_threads(), "mlp_hidden": None if which == "gpt2" else mlp_hidden,
            "compiled": compiled, "device": torch.cuda.get_device_name(task.device) if task.device.type == "cuda" else "cpu",
            # the table's peak MB is the process's host memory; on a GPU this is the device's
            **({"gpu_peak_mb": torch.cuda.max_memory_allocated(task.device) / 2**20} if task.device.type == "cuda" else {})}
