"""Training machinery shared by every kind: the loop skeleton, ensembles, data streams, checkpoints."""

from anchoring.train.ensemble import Ensemble
from anchoring.train.skeleton import Diverged, TrainingInterrupted, fit

__all__ = ["Diverged", "Ensemble", "TrainingInterrupted", "fit"]
