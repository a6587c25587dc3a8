"""Training: ensembles in lockstep, data streams, objective, checkpoints."""

from anchoring.train.ensemble import Ensemble
from anchoring.train.loop import TrainingInterrupted, TrainResult, train

__all__ = ["Ensemble", "TrainResult", "TrainingInterrupted", "train"]
