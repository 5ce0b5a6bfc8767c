"""Training on BCSS-style labelled regions: data checks and sampling, the training run, validation.

The names below are imported on first use, so that light modules of this package (splits, the
command line's defaults) load without torch.
"""

__all__ = ["TrainConfig", "TrainResult", "predict_labels", "train"]


def __getattr__(name: str):
    if name in ("TrainConfig", "TrainResult", "train"):
        from bcseg.training import loop

        return getattr(loop, name)
    if name == "predict_labels":
        from bcseg.training.predict import predict_labels

        return predict_labels
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
