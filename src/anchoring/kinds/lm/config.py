"""The language-model kind's config: `[text]` (data side), `[lm]` (model and batches), `[train]`, `[evaluate]`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from anchoring.config import TrainConfig, TrainedExperiment, _Strict
from anchoring.domains.text.config import TextConfig

ARMS = ("anchored", "control", "weak-filtered", "oracle-filtered", "sgtm", "routing")
WEAK_LABEL_ARMS = {"anchored", "weak-filtered", "sgtm", "routing"}  # the arms that train on the weak labels
Arm = Literal["anchored", "control", "weak-filtered", "oracle-filtered", "sgtm", "routing"]


class LMConfig(_Strict):
    """The normalised transformer at LM size, and how training windows are cut."""

    width: int = Field(128, ge=8)
    layers: int = Field(4, ge=1, le=48)
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1, le=8)
    mlp_hidden: int | None = Field(None, ge=1, description="hidden units of each MLP (default: mlp_ratio × width); "
                                                          "344 ≈ 8/3 × 128 gives a GELU MLP 4×'s parameter count")
    context: int = Field(256, ge=8, le=8192, description="the model's context (longest sequence it accepts)")
    window: int | None = Field(None, ge=2, description="tokens per training window (default: the context); "
                                                       "must not exceed the context")
    batch_size: int = Field(16, ge=1, le=4096, description="windows per step (global, over all data-parallel ranks)")
    alpha: float = Field(0.2, gt=0, description="initial step size α of every block")
    logit_scale: float = Field(10.0, gt=0)
    arms: list[Arm] = Field(default_factory=lambda: ["anchored", "control"],
                            description="anchored | control | weak-filtered | oracle-filtered | sgtm | routing (all "
                                        "share seeds, batch stream and labels)")
    workers: int = Field(1, ge=0, description="processes training (arm, seed) jobs side by side (0: one per CPU core)")
    nproc: int = Field(1, ge=1, le=64, description="data-parallel processes per job (gloo; NCCL on CUDA with a GPU each): each "
                                                  "takes batch_size/nproc windows of every step; jobs then run one after another")
    route: bool = Field(False, description="anchored arm: at weakly labelled positions, gradients flow back through "
                                           "each anchored site only along the concept's direction(s), so the layers "
                                           "before it can teach the concept only through the anchor (anchor.route)")
    self_label: float | None = Field(None, gt=0.0, lt=1.0,
                                     description="anchored arm: from step self_label_from on, every position whose "
                                                 "alignment at the anchored site exceeds this counts as labelled for the "
                                                 "sequence terms (pulled by the anchor, no longer pushed off by the "
                                                 "anti-subspace terms); None: only the weak labels count")
    self_label_from: int = Field(0, ge=0, description="first step at which self_label applies")
    self_label_mode: Literal["pull", "spare"] = Field("pull", description="pull: self-labelled positions count as "
                                                     "labelled for every term; spare: the clearing terms leave them "
                                                     "alone, but the anchor does not pull them")

    @model_validator(mode="after")
    def _shape(self) -> "LMConfig":
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of even size")
        if self.window is not None and self.window > self.context:
            raise ValueError(f"window {self.window} is longer than the model's context {self.context}")
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} does not split over nproc = {self.nproc} processes")
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError(f"arms must be distinct and non-empty, got {self.arms}")
        return self

    @property
    def tokens(self) -> int:
        """Tokens per training window."""
        return self.window or self.context


class SGTMConfig(_Strict):
    """The `sgtm` arm (selective gradient masking): which entries of each block are "forget"
    parameters, the only ones the loss of predicting weakly labelled tokens updates (see `kinds.lm.baselines`)."""

    heads: int = Field(1, ge=0, description="attention heads per block that are forget parameters (the last ones)")
    mlp_fraction: float = Field(1 / 16, ge=0, le=1, description="share of each block's MLP hidden units that are "
                                                                "forget parameters (the last ones; at least one if > 0)")
    layers: list[int] | None = Field(None, description="blocks with forget parameters (default: every block)")

    @model_validator(mode="after")
    def _some(self) -> "SGTMConfig":
        if self.heads == 0 and self.mlp_fraction == 0:
            raise ValueError("sgtm: heads = 0 and mlp_fraction = 0 designate no forget parameters")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"sgtm.layers must be distinct and non-empty, got {self.layers}")
        return self


class RoutingConfig(_Strict):
    """The `routing` arm (gradient routing, expand–route–ablate): extra MLP hidden units in these
    blocks learn only from positions whose next token is weakly labelled, and are zeroed after training."""

    layers: list[int] = Field(default_factory=lambda: [0, 1], description="blocks whose MLP gets the extra units")
    extra_units: int = Field(64, ge=1, description="extra hidden units per routed block")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"routing.layers must be distinct and non-empty, got {v}")
        return v


class LMTrainConfig(TrainConfig):
    device: Literal["cpu", "auto", "cuda"] = Field("cpu", description="'auto': CUDA when available, else CPU")
    compile: bool = Field(False, description="run the training forward (and its backward) through torch.compile: "
                          "fused kernels, the same model to float rounding; the first step of every arm pays the "
                          "compilation (about 35 s on one CPU thread at the default size) and CPU needs a C++ compiler")
    seeds: int = Field(1, description="number of seeds; every arm trains on each")
    checkpoint_every: int = Field(100, ge=1)


class LMEvaluateConfig(_Strict):
    concept: str | None = Field(None, description="anchored concept measured (default: text.concept)")
    eval_chars: int = Field(60_000, ge=1000, description="validation characters scored (whole passages, in `order`)")
    order: Literal["corpus", "shuffled"] = Field("corpus", description="which validation passages come first: corpus "
                                                 "order, or one fixed permutation of the split (for a concept confined "
                                                 "to one part of the corpus)")
    after: int = Field(20, ge=0, description="characters after a concept word that still count as concept positions")
    probe_positions: int = Field(3000, ge=50, description="positions per class (concept, retain) the probes fit on")
    shade_passages: int = Field(3, ge=0, le=10, description="held-out passages printed with per-character alignment")
    batch_size: int = Field(16, ge=1)
    ood: bool = Field(False, description="also score out-of-distribution sets by passage-mean s₂ and surprisal (lm-ood)")
    ood_passages: int = Field(200, ge=5, description="passages per OOD set")
    ood_min_chars: int = Field(200, ge=10, le=600, description="shortest held-out passage an OOD set draws "
                               "(at most 600: every passage is cropped to 600 characters)")

    @field_validator("concept")
    @classmethod
    def _c(cls, v: str | None) -> str | None:
        return v or None


Posthoc = Literal["mean-difference", "leace"]


class UnlearningConfig(_Strict):
    """`[unlearning]`: forget/retain loss after each method's edit, and how well the edit survives fine-tuning."""

    enabled: bool = Field(False, description="measure every unlearning method after training (needs the control arm)")
    relearn_k: list[int] = Field(default_factory=lambda: [4, 16, 64],
                                 description="forget passages (reference-positive, training) the attacker fine-tunes on")
    relearn_steps: int = Field(40, ge=0, description="Adam steps of each relearning fine-tune")
    relearn_lr: float = Field(1e-3, gt=0, description="learning rate of the relearning and recovery fine-tunes")
    relearn_batch: int = Field(8, ge=1, description="windows per fine-tuning step")
    recover_steps: int = Field(100, ge=0, description="most steps of the 50/50 forget/retain fine-tune (steps to recover)")
    eval_chars: int = Field(20_000, ge=200, description="validation characters the fine-tuning curves are scored on "
                                                        "(every step, so keep it small)")
    attack_hooks: bool = Field(True, description="fine-tune the hook methods (the suppress rows) too, with the hook kept in "
                                                  "place: the attack a hook that ships inside the model has to survive "
                                                  "(the matched random move, a control, is never fine-tuned)")
    attack_unedited: bool = Field(False, description="run every attack on each method's unedited model too, and count "
                                  "each row's kept share also from where that attack takes the unedited model "
                                  "(`kept_unedited`): a fine-tune that lowers the unedited model's own concept loss "
                                  "would otherwise take that drop off every edit's share (one more attack per K "
                                  "and unedited model)")
    posthoc: list[Posthoc] = Field(default_factory=lambda: ["mean-difference", "leace"],
                                   description="post-hoc directions fitted on the control arm")
    repair_steps: int = Field(0, ge=0, description="retain-only fine-tuning steps after every edit, with the edit "
                                                    "re-applied after each step, before it is scored and attacked (0: none)")
    repair_lr: float = Field(1e-4, gt=0, description="learning rate of the repair fine-tune (a fresh Adam at 1e-3 "
                                                    "moves a converged model enough to cost retain text by itself)")
    distil_steps: int = Field(0, ge=0, description="distil anchoring's deletion into a fresh (or partly noised) model for "
                              "this many steps on all training text, and score it as a row of its own, with the same "
                              "distillation of the unedited anchored model as its control row (0: none; two "
                              "distillations per seed, each about a training run's time at 1000 steps)")
    distil_noise: float = Field(1.0, gt=0, le=1, description="how far the student starts from the teacher's weights "
                                "towards a fresh model's (1: a fresh model)")
    distil_lr: float = Field(3e-3, gt=0, description="peak rate of the distillation (warm-up from 1e-4, flat, down to a tenth)")
    fit_positions: int = Field(32768, ge=20, description="training positions the post-hoc directions are fitted on "
                                                         "(read from the control stream, one batch of windows at a time)")

    @field_validator("relearn_k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("relearn_k needs at least one K")
        bad = [k for k in v if k <= 0]
        if bad:
            raise ValueError(f"relearn_k entries must be positive passage counts, got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError(f"relearn_k entries must be distinct, got {v}")
        return v

    @field_validator("posthoc")
    @classmethod
    def _p(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"posthoc methods must be distinct, got {v}")
        return v


class LMExperiment(TrainedExperiment):
    """kind = "lm": a character (or BPE) normalised-transformer LM, anchored arm plus controls."""

    kind: Literal["lm"] = "lm"
    text: TextConfig = Field(default_factory=TextConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    evaluate: LMEvaluateConfig = Field(default_factory=LMEvaluateConfig)
    unlearning: UnlearningConfig = Field(default_factory=UnlearningConfig)
    sgtm: SGTMConfig = Field(default_factory=SGTMConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    @model_validator(mode="after")
    def _unlearning_arms(self) -> "LMExperiment":
        if self.unlearning.enabled and "control" not in self.lm.arms:
            raise ValueError("unlearning.enabled needs the control arm (the 'before' of every filter and post-hoc method)")
        if self.unlearning.enabled and self.unlearning.distil_steps and "anchored" not in self.lm.arms:
            raise ValueError("unlearning.distil_steps distils anchoring's deletion, and lm.arms has no anchored arm")
        return self

    @model_validator(mode="after")
    def _blocks(self) -> "LMExperiment":
        """The [sgtm] / [routing] sections against the model's shape, where their arm is trained."""
        n = self.lm.layers
        for name, layers in (("sgtm", self.sgtm.layers or []), ("routing", self.routing.layers)):
            bad = [i for i in layers if not 0 <= i < n]
            if name in self.lm.arms and bad:
                raise ValueError(f"{name}.layers: no block {bad[0]} (the model has {n} blocks: 0..{n - 1})")
        if "sgtm" in self.lm.arms and self.sgtm.heads > self.lm.heads:
            raise ValueError(f"sgtm.heads = {self.sgtm.heads} exceeds the model's {self.lm.heads} heads per block")
        return self
