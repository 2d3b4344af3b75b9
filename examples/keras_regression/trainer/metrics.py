"""A Keras callback that prints stackml metric lines (one JSON object per line on stdout).

The protocol (see the stackml README): a line whose JSON object has ``"stackml_metric": 1``;
``"epoch"`` / ``"step"`` say where in training it was measured, every other numeric key is a
metric. Only the standard library and Keras are needed, so trainers can copy this file.
"""

from __future__ import annotations

import json
import math
import sys

import keras


def metric_line(metrics: dict, *, epoch: int | None = None, step: int | None = None) -> str:
    obj: dict = {"stackml_metric": 1}
    if epoch is not None:
        obj["epoch"] = int(epoch)
    if step is not None:
        obj["step"] = int(step)
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            obj[key] = number
    return json.dumps(obj)


def emit(metrics: dict, *, epoch: int | None = None, step: int | None = None) -> None:
    print(metric_line(metrics, epoch=epoch, step=step), file=sys.stdout, flush=True)


class StackMLMetrics(keras.callbacks.Callback):
    """Prints the epoch's logs (loss, val_loss, ...) as a metric line; epochs count from 1."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        emit(logs or {}, epoch=epoch + 1)
