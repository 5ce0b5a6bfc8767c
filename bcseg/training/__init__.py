"""Training on BCSS-style labelled regions: data checks and sampling, the training run, validation."""

from bcseg.training.loop import TrainConfig, TrainResult, train
from bcseg.training.predict import predict_labels

__all__ = ["TrainConfig", "TrainResult", "predict_labels", "train"]
