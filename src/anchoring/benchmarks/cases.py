"""What the benchmark measures. Each case runs in its own process and prints one JSON line.

The baseline is the loop a user would write by hand for one model: an eager `nn.Module`,
`torch.optim.Adam`, forward hooks for the latent, the same objective, labels and schedule
as the built-in `anchored` experiment. The ensemble cases run the project's trainer on E
seeds at once. Times cover training steps only (set-up excluded); end-to-end cases are timed
by the parent around a whole `anchoring run` process.
"""

from __future__ import annotations

import time

import torch

from anchoring.anchor import Capture
from anchoring.experiments import load
from anchoring.kinds.colour.objective import (
    build_model,
    build_objective,
    build_timeline,
    training_points,
)
from anchoring.kinds.colour.training import train
from anchoring.train.data import WeightedPoints
from anchoring.train.skeleton import flush_denormals

EXPERIMENT = "anchored"


def ensemble_config(seeds: int, steps: int, fast: bool = True):
    """The config every ensemble case trains (also what the CLI sizes memory from before measuring)."""
    cfg = load(EXPERIMENT)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seeds": seeds, "steps": steps, "fast": fast})})


def eager_baseline(steps: int) -> dict:
    """One model, written the obvious way; the yardstick every ensemble figure is divided by.

    It gets what the trainer gets, so the ratio measures the ensemble and nothing else: fused Adam
    with the same betas, denormals flushed, and the first (warm-up) step left out of the time."""
    cfg = ensemble_config(1, steps)
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = build_objective(cfg)
    timeline = build_timeline(cfg, objective)
    table = torch.from_numpy(timeline.table()).float()
    col = {n: i for i, n in enumerate(timeline.names)}
    points, weights = training_points(cfg)
    sampler = WeightedPoints(points, weights)
    probs = {c.name: c.labeller.probability(points) for c in objective.concepts}
    opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=cfg.train.betas, fused=True)
    g = torch.Generator().manual_seed(0)
    with Capture(model, objective.sites) as cap, flush_denormals():
        t0 = time.perf_counter()
        for step in range(steps):
            if step == 1:
                t0 = time.perf_counter()  # exclude the warm-up step, as the ensemble cases do
            idx = sampler.indices(torch.rand(cfg.data.batch_size, generator=g))
            x = points[idx]
            labels = {n: (torch.rand(len(idx), generator=g) < p[idx]).float() for n, p in probs.items()}
            for group in opt.param_groups:
                group["lr"] = float(table[step, col["lr"]])
            opt.zero_grad()
            loss = (model(x) - x).pow(2).mean()
            for term in objective.terms:
                loss = loss + float(table[step, col[term.weight]]) * term(cap.acts, labels)
            loss.backward()
            opt.step()
        elapsed = time.perf_counter() - t0
    timed = steps - 1 if steps > 1 else steps
    return {"seconds": elapsed, "steps": timed, "model_steps_per_s": timed / elapsed}


def ensemble(seeds: int, steps: int, fast: bool = True) -> dict:
    """The project's trainer on `seeds` members; model-steps/s counts every member's step."""
    cfg = ensemble_config(seeds, steps, fast)
    done = {}

    def progress(i: int, total: int) -> None:
        if i == 1:
            done["t1"] = time.perf_counter()  # exclude set-up and the first (warm-up) step

    t0 = time.perf_counter()
    result = train(cfg, progress=progress)
    t1 = time.perf_counter()
    elapsed = t1 - done.get("t1", t0)
    timed = steps - 1 if "t1" in done else steps
    return {"seconds": elapsed, "steps": timed, "model_steps_per_s": seeds * timed / elapsed,
            "fast_path": result.fast, "total_s": t1 - t0}


def text_pipeline() -> dict:
    """Load, split, char-tokenize and reference-label the whole Shakespeare corpus, cache warm
    (one untimed pass first fills it)."""
    from anchoring.domains.text.bench import text_pipeline_timing

    text_pipeline_timing()
    t = text_pipeline_timing()
    return {"seconds": t["total_s"], **{k: v for k, v in t.items() if k != "total_s"}}


def surprise_page(chars: int = 10_000) -> dict:
    """Score 10,000 characters with the default LM size (random weights) and write the page."""
    from anchoring.domains.text.tokenize import CharTokenizer
    from anchoring.models import NormalizedTransformer
    from anchoring.report.surprise_page import render_surprise

    line = "Now is the winter of our discontent made glorious summer by this sun of York;\n"
    text = (line * (chars // len(line) + 1))[:chars]
    tok = CharTokenizer.train([text + "".join(chr(c) for c in range(32, 127))])
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=128, layers=4, heads=4, context=256).eval()
    render_surprise(model, tok, text[:300], title="warm-up")
    t0 = time.perf_counter()
    page = render_surprise(model, tok, text, title="bench")
    return {"seconds": time.perf_counter() - t0, "chars": chars, "page_bytes": len(page)}
