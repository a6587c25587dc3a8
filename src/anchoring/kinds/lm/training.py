"""Training one (arm, seed) of an LM run: the batch stream, the task loss, the anchored arm's terms.

Every arm of a seed starts from the same initial weights (`torch.manual_seed(seed)` before the
model is built), reads the same stream (filtered arms skip their removed passages, see `data`) and
the same weak labels. Only the anchored arm adds its terms. The `sgtm` and `routing` arms use the
labels to steer gradients (see `baselines`); the routing arm's model has extra MLP units, added
after the shared initial weights are drawn, so its other weights still equal the control's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from anchoring.anchor import Capture, build_term
from anchoring.anchor.concepts import build_concepts
from anchoring.anchor.route import RouteThrough
from anchoring.anchor.sequence import Positions, SequenceObjective, SequenceSite, SequenceTerm
from anchoring.domains.text.lexicons import CONCEPTS
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.baselines import forget_masks, routing
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import LMData, Stream
from anchoring.kinds.lm.evaluate import direction_alignment
from anchoring.models import NormalizedTransformer
from anchoring.schedule import Timeline
from anchoring.train.masking import masked_backward
from anchoring.train.skeleton import MetricRows, fit
from anchoring.train.timeline import fit_steps, parse_schedule

PER_VECTOR = ("anchor", "anti-anchor", "subspace", "anti-subspace")


class _TextLabels:
    """Placeholder labeller: text labels come from the weak set, not from a function of the input."""

    scale = 1.0




def build_model(cfg: LMExperiment, vocab: int, arm: str | None = None, seed: int = 0) -> NormalizedTransformer:
    """The arm's model: the routing arm's has `routing.extra_units` extra MLP units in `routing.layers`
    (drawn from a generator seeded with `seed`, apart from the global RNG); every other arm's is plain."""
    m = cfg.lm
    extra = {i: cfg.routing.extra_units for i in cfg.routing.layers} if arm == "routing" else None
    try:
        return NormalizedTransformer(vocab, m.width, m.layers, m.heads, m.context, m.mlp_ratio, m.alpha, m.logit_scale,
                                     extra_units=extra, extra_seed=seed, mlp_hidden=m.mlp_hidden)
    except ValueError as e:
        raise AnchoringError(f"routing.layers: {e}") from None


def build_objective(cfg: LMExperiment, model: torch.nn.Module) -> SequenceObjective:
    """Bind every term to the model (sites must exist, axes/dims fit the width), naming the term."""
    width = cfg.lm.width
    concepts = build_concepts(cfg.concepts, width, lambda _name: _TextLabels())
    for name in concepts:
        if name != cfg.text.concept:
            want = cfg.text.concept
            keys = [f"concepts.{i}.name" for i, c in enumerate(cfg.concepts) if c.name == name]
            keys += [f"terms.{j}.concept" for j, t in enumerate(cfg.terms) if t.concept == name]
            back = f", or label {name!r} instead: --set text.concept={name}" if name in CONCEPTS else ""
            raise AnchoringError(f"concept {name!r}: an LM run labels only text.concept ({want!r}); to anchor {want!r}, "
                                 f"rename the concept too: " + " ".join(f"--set {k}={want}" for k in keys) + back)
    terms: list[SequenceTerm] = []
    for t in cfg.terms:
        label = t.name or (f"{t.kind}:{t.concept}" if t.concept else t.kind)
        if t.kind not in PER_VECTOR:
            raise AnchoringError(f"term {label!r}: {t.kind!r} is not available on sequences (use {', '.join(PER_VECTOR)})")
        if t.head is not None:
            raise AnchoringError(f"term {label!r}: LM terms read the residual stream (`embed`, `blocks.i`); no heads")
        if t.site not in dict(model.named_modules()):  # the sites there are, rather than every module of the model
            residual = ", ".join(["embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]])
            raise AnchoringError(f"term {label!r} reads {t.site!r}, which a model of lm.layers = {cfg.lm.layers} does "
                                 f"not have (residual sites: {residual})")
        if t.concept is not None and t.concept not in concepts:
            stale = [f"--set terms.{j}.concept={cfg.text.concept}" for j, u in enumerate(cfg.terms) if u.concept == t.concept]
            fix = f"; to rename it: {' '.join(stale)}" if cfg.text.concept in concepts else ""
            raise AnchoringError(f"term {label!r} names unknown concept {t.concept!r} (defined: "
                                 f"{', '.join(concepts) or 'none'}){fix}")
        base = build_term(t.kind, t.weight, latent_dim=width, site=t.site,
                          concept=concepts.get(t.concept) if t.concept else None, select=t.select,
                          direction=t.direction, dims=t.dims, name=t.name)
        positions = Positions.parse(t.positions or "all", {})
        if positions.kind == "mellowmax" and cfg.text.weak_labels == "spans":
            raise AnchoringError(f"term {label!r}: mellowmax pools over labelled passages, but text.weak_labels = "
                                 f"'spans' labels positions; use positions = 'all' with select = 'labelled'")
        if positions.kind == "mellowmax" and base.select == "all":
            raise AnchoringError(f"term {label!r}: mellowmax pools over passages of one side, so it needs select = "
                                 f"'labelled' (soft minimum) or 'unlabelled' (soft maximum)")
        terms.append(SequenceTerm(base.name, t.kind, t.weight, SequenceSite(t.site), base.formula, positions,
                                  base.concept, base.select, base.params.get("direction")))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise AnchoringError(f"term names must be unique (got {names}); set `name`")
    return SequenceObjective(concepts, terms)


def build_timeline(cfg: LMExperiment, objective: SequenceObjective) -> Timeline:
    timeline = parse_schedule(cfg.schedule, f"{cfg.name} schedule", objective.weight_names)
    if timeline.actions:
        step = min(timeline.actions)
        raise AnchoringError(f"schedule ACTION {timeline.actions[step][0]!r} at step {step}: LM runs take no actions")
    return fit_steps(timeline, cfg.train.steps)


def device_of(cfg: LMExperiment) -> torch.device:
    d = cfg.train.device
    if d == "cuda" and not torch.cuda.is_available():
        raise AnchoringError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if d == "cuda" or (d == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_compile(cfg: LMExperiment) -> None:
    """`train.compile` on CPU needs a C++ compiler for inductor's kernels: say so in one line before
    the run directory exists, not in a compiler traceback at the first step."""
    if not cfg.train.compile or device_of(cfg).type != "cpu":
        return
    problem = missing_cpp_compiler()
    if problem:
        raise AnchoringError(f"train.compile = true needs a C++ compiler for CPU kernels and found none "
                             f"({problem}); install g++ or set CXX, or leave train.compile off")


def missing_cpp_compiler() -> str | None:
    """Why inductor could not find a C++ compiler for CPU kernels (the error's type), or None if it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler, or anything its search raises
        return type(e).__name__
    return None


def compiled(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`train.compile`: the model's forward through torch.compile, for training steps only.

    Why: the normalised transformer spends a large share of a small model's CPU step on element-wise
    ops (five normalisations per block, the lerps, the learned scales), each a separate pass over
    memory in eager mode; inductor fuses them. The module itself is untouched, so its hooks,
    parameters and checkpoints are the eager model's, and evaluation and relearning stay eager.

    By default (`torch._dynamo.config.skip_nnmodule_hook_guards`) dynamo does not guard on module
    hooks, so a graph compiled for one arm (the control, with no hooks) would be reused for the next
    arm of the same shape without its anchoring hooks. Every task therefore starts from an empty
    compile cache (`torch._dynamo.reset`, which also drops any other compiled code in the process),
    and its graph is built at its first step, with the hooks it trains with already in place."""
    torch._dynamo.reset()
    return torch.compile(model)


@dataclass
class ArmResult:
    arm: str
    seed: int
    model: NormalizedTransformer
    metric_names: list[str]
    metrics: np.ndarray  # (steps, metrics)
    seconds: float = 0.0  # time spent in training steps, summed over every session that trained it (NaN: unknown)


def term_columns(names: list[str]) -> list[str]:
    """The regularizer terms' columns of an arm's metric rows (`LMTask.names`): those between
    "task" and "labelled_passages". The schedule's weight columns come first and may share a
    term's prefix (the weight `anchor`, the term `anchor@3`), so a prefix cannot tell them apart."""
    return names[names.index("task") + 1:names.index("labelled_passages")]


class LMTask(MetricRows):
    """One optimiser step of one (arm, seed); the `Task` that `train.skeleton.fit` drives.

    With `rank`/`world` (data parallel) the task takes only its rank's rows of the global batch and
    averages gradients over ranks before the step, so every rank holds the same model as one
    process taking the whole batch."""

    def __init__(self, cfg: LMExperiment, data: LMData, seed: int, arm: str, *, device: torch.device | None = None,
                 rank: int = 0, world: int = 1) -> None:
        self.cfg, self.seed, self.arm = cfg, seed, arm
        self.device = device or device_of(cfg)
        self.rank, self.world = rank, world
        torch.manual_seed(seed)
        self.model = build_model(cfg, data.vocab_size, arm, seed).to(self.device)
        self.objective = build_objective(cfg, self.model)
        self.timeline = build_timeline(cfg, self.objective)
        self.terms = self.objective.terms if arm == "anchored" else []
        self.table = self.timeline.table()
        self.col = {n: i for i, n in enumerate(self.timeline.names)}
        self.stream = Stream(data.train_tokens, data.keep(arm, seed), seed, cfg.lm.tokens, data.span_masks())
        self.labels = data.weak(seed)
        B = cfg.lm.batch_size
        if B % world:
            raise AnchoringError(f"lm.batch_size {B} does not split over {world} processes")
        self.rows_of_rank = range(rank * B // world, (rank + 1) * B // world)
        self.self_label = self_labeller(cfg, self.objective) if arm == "anchored" else None
        self.names = [*self.timeline.names, "loss", "task", *[t.name for t in self.objective.terms], "labelled_passages",
                      *(["self_labelled"] if cfg.lm.self_label is not None else [])]
        self.metric_names = ["loss", "task", *[t.name for t in self.terms]]
        self.steps = self.timeline.steps
        self.rows = np.full((self.steps, len(self.names)), np.nan)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.0, betas=cfg.train.betas, fused=fused or None,
                                          foreach=None if fused else True)  # foreach: one kernel per op over all params
        self.params = dict(self.model.named_parameters())
        self.cap: Capture | None = None
        self.route: RouteThrough | None = None
        self.forget = {k: v.to(self.device) for k, v in forget_masks(self.model, cfg).items()} if arm == "sgtm" else None
        self.seconds = 0.0
        check_compile(cfg)
        # SGTM takes two backward passes through one graph (retain_graph); through the compiled graph
        # the second step's gradients came out up to 26% off eager's (cause not found), so it stays eager
        self.forward = compiled(self.model) if cfg.train.compile and arm != "sgtm" else self.model

    def lr(self, step: int) -> float:
        return float(self.table[step][self.col["lr"]])

    def state(self, steps_done: int) -> dict[str, torch.Tensor]:
        """The metric rows, plus the seconds spent in steps so far: a job's training time survives a
        resume and is known even when the job ran in a worker process."""
        return {**super().state(steps_done), "seconds": torch.tensor([self.seconds], dtype=torch.float64)}

    def restore(self, steps_done: int, tensors: dict[str, torch.Tensor]) -> None:
        super().restore(steps_done, tensors)
        # a checkpoint written before the seconds were kept: the time already spent is unknown (NaN
        # stays NaN as steps add to it), not zero
        self.seconds = float(tensors["seconds"][0]) if "seconds" in tensors else float("nan")

    def step(self, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._step(step)
        finally:
            self.seconds += time.perf_counter() - t0

    def _step(self, step: int) -> torch.Tensor:
        b = self.stream.batch(step, self.cfg.lm.batch_size, self.labels, self.rows_of_rank)
        dev = self.device
        x, y, line, lab = b.inputs.to(dev), b.targets.to(dev), b.line.to(dev), b.line_labels.to(dev)
        pos = b.labels.to(dev)
        if self.route is not None:
            self.route.mask = pos.bool()
        values = self.table[step]
        # share of the positions the model labelled itself: 0 until self_label_from, NaN in an arm that never does
        n_self = torch.tensor(0.0 if self.self_label is not None else float("nan"))
        self.optimizer.zero_grad(set_to_none=True)
        if self.arm in ("sgtm", "routing"):
            loss = task = self._baseline_backward(x, y, b.target_labels.to(dev).bool())
            term_values: list[torch.Tensor] = []
        else:
            logits = self.forward(x)  # the hooks refresh cap.acts in this same pass
            task = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            spared = pos  # the positions the clearing (select = unlabelled) terms leave alone
            if self.self_label is not None and step >= self.cfg.lm.self_label_from:
                spared, n_self = self.self_label(self.cap.acts, pos)
                if self.cfg.lm.self_label_mode == "pull":
                    pos = spared
            term_values = [self._term(t, line, lab, spared if t.select == "unlabelled" else pos) for t in self.terms]
            loss = task
            for t, v in zip(self.terms, term_values):
                loss = loss + float(values[self.col[t.weight]]) * v
            loss.backward()
        if self.world > 1:
            _average_gradients(self.model, self.world)
        self.optimizer.step()
        self.model.normalize_weights()
        stats = torch.stack([loss.detach(), task.detach(), *[v.detach() for v in term_values]])
        n_lab = lab.sum().detach().reshape(1)
        if self.cfg.lm.self_label is not None:
            stats = torch.cat([stats, n_self.reshape(1).to(stats)])
        if self.world > 1:  # metrics of the global batch: means of the ranks' means, total labelled passages
            import torch.distributed as dist

            dist.all_reduce(stats)  # on the training device: an NCCL group reduces CUDA tensors only
            stats /= self.world
            dist.all_reduce(n_lab)
        stats, n_lab = stats.cpu(), n_lab.cpu()
        tv = dict(zip([t.name for t in self.terms], stats[2:2 + len(self.terms)].tolist()))
        self.rows[step] = [*values, float(stats[0]), float(stats[1]), *[tv.get(t.name, np.nan) for t in self.objective.terms],
                           float(n_lab), *([float(stats[-1])] if self.cfg.lm.self_label is not None else [])]
        return stats[:len(self.metric_names)]  # what divergence is judged on: the self-labelled share is NaN by design in other arms

    def _baseline_backward(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the sgtm / routing arms (gradients into `.grad`); returns the mean CE.
        `labelled` marks the positions whose *target* token is labelled, the losses both methods steer.

        sgtm: the labelled positions' CE and the rest's, each summed and divided by all positions,
        go through `masked_backward` (labelled → forget entries only). routing: one mean CE, its
        gradients routed by the MLPs' `route` mask during this forward."""
        if self.arm == "routing":
            with routing(self.model, labelled):
                task = F.cross_entropy(self.forward(x).flatten(0, 1), y.flatten())
                task.backward()
            return task
        ce = F.cross_entropy(self.forward(x).flatten(0, 1), y.flatten(), reduction="none")
        w = labelled.flatten().to(ce.dtype)
        lab_loss, rest = (ce * w).sum() / ce.numel(), (ce * (1.0 - w)).sum() / ce.numel()
        masked_backward(lab_loss, rest, self.params, self.forget)
        return (lab_loss + rest).detach()

    def _term(self, t: SequenceTerm, line: torch.Tensor, lab: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A term's value on this batch (`lab` per line, `pos` per position). Data parallel: this rank's
        share of the *global* mean, scaled by the number of ranks (gradients are averaged over ranks),
        so N ranks equal one process."""
        concept = self.cfg.text.concept
        if self.world == 1:
            return t(self.cap.acts, line, line, {concept: lab}, {concept: pos})
        import torch.distributed as dist

        num, den = t.parts(self.cap.acts, line, line, {concept: lab}, {concept: pos})
        den = den.detach().clone()
        dist.all_reduce(den)
        return num / den.clamp_min(1.0) * self.world


def self_labeller(cfg: LMExperiment, objective: SequenceObjective
                  ) -> Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """`lm.self_label` (self-training): a function `(acts, pos) → (pos ∪ self-labelled, share self-labelled)`.

    Why: a weak label covers a fraction of the concept's passages, and the anti-subspace terms push
    every unlabelled position off the axis, the unlabelled 70% of the concept's spans included, though
    they hold the very same words. Once the anchor has formed, positions the model itself puts near
    the axis are taken as labelled, so the pull and the push stop fighting over them. The alignment
    is read from this step's forward at the first anchored site, detached: a label, not a loss."""
    tau = cfg.lm.self_label
    if tau is None:
        return None
    concept = cfg.text.concept
    term = next((t for t in objective.terms if t.kind in ("anchor", "subspace") and t.concept == concept), None)
    if term is None:
        raise AnchoringError("lm.self_label: the anchored arm has no anchor or subspace term for the concept")
    anchors = dict(objective.anchors(concept))
    direction = anchors.get(term.site)
    dims = objective.concepts[concept].dims if direction is None else None
    if direction is None and not dims:
        raise AnchoringError("lm.self_label: the concept has neither an anchor direction nor dims to measure alignment on")

    def label(acts: dict[str, torch.Tensor], pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            a = direction_alignment(term.site.read(acts), None if direction is None else direction.to(pos.device), dims)
            mine = (a > tau).to(pos.dtype)
        return torch.maximum(pos, mine), (mine * (1.0 - pos)).mean()

    return label


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce every gradient (one flat buffer) and divide by the number of ranks."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


@contextmanager
def routed(task: "LMTask") -> Iterator[RouteThrough | None]:
    """`lm.route` on the anchored arm: labelled positions' gradients pass each anchored site only
    along the concept's direction(s); every other arm (and route = false) trains unrouted."""
    if task.arm != "anchored" or not task.cfg.lm.route:
        yield None
        return
    from anchoring.kinds.lm.edits import concept_directions  # edits → kind → training: import late

    sites = [t.site.module for t in task.terms if t.kind in ("anchor", "subspace")]
    if not sites:
        raise AnchoringError("lm.route: the anchored arm has no anchor or subspace term to route through")
    with RouteThrough(task.model, sites, concept_directions(task.cfg)) as route:
        yield route


def train_arm(cfg: LMExperiment, data: LMData, seed: int, arm: str, *, checkpoint: Path | None = None,
              progress: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
              should_stop: Callable[[], bool] | None = None) -> ArmResult:
    """Train one model; `progress(step)` after each step. Resumes from `checkpoint` if it exists;
    `should_stop` as in `fit`."""
    task = LMTask(cfg, data, seed, arm, rank=rank, world=world)
    report = (lambda done, _total: progress(done)) if progress is not None else None
    with Capture(task.model, [t.site.module for t in task.terms]) as cap, routed(task) as route:
        task.cap, task.route = cap, route  # Capture's hooks come first: the terms see the unrouted states
        task.model.train()
        if checkpoint is not None and rank > 0:  # every rank holds the same state; each keeps its own file
            checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{rank}{checkpoint.suffix}")
        fit(task, checkpoint=checkpoint, every=cfg.train.checkpoint_every, progress=report, should_stop=should_stop)
    task.model.eval()
    return ArmResult(arm, seed, task.model.cpu(), task.names, task.rows, task.seconds)
