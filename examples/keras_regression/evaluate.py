"""Compare a SavedModel exported by the example trainer with the function its synthetic data
comes from (``trainer.task.known_function``), on fresh points it never saw.

Usage: ``python evaluate.py MODEL_DIR [ROWS]`` — prints one JSON object:
``{"rows": n, "finite": true, "rmse": ..., "max_abs_error": ..., "target_std": ...,
"noise_std": 0.1}``. ``rmse`` is measured against the noiseless function, so a model that
learned it well has an RMSE far below ``target_std`` (what predicting the mean would give).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EVAL_SEED = 98765  # not the training seed: these rows were never trained on


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python evaluate.py MODEL_DIR [ROWS]", file=sys.stderr)
        return 2
    rows = int(argv[1]) if len(argv) == 2 else 2000
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow loads: quiet
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import tensorflow as tf
    from trainer.task import N_FEATURES, NOISE, target

    loaded = tf.saved_model.load(argv[0])
    signature = loaded.signatures["serving_default"]
    _args, kwargs = signature.structured_input_signature
    ((name, spec),) = kwargs.items()
    if int(spec.shape[-1]) != N_FEATURES:
        print(f"the model takes {spec.shape[-1]} features, not {N_FEATURES}", file=sys.stderr)
        return 1
    x = np.random.default_rng(EVAL_SEED).normal(size=(rows, N_FEATURES)).astype("float32")
    outputs = signature(**{name: tf.constant(x, dtype=spec.dtype)})
    predicted = outputs[sorted(outputs)[0]].numpy().reshape(rows, 1).astype("float64")
    expected = target(x).astype("float64")
    finite = bool(np.isfinite(predicted).all())
    error = predicted - expected
    report = {
        "rows": rows,
        "finite": finite,
        "rmse": float(np.sqrt(np.mean(error**2))) if finite else None,
        "max_abs_error": float(np.max(np.abs(error))) if finite else None,
        "target_std": float(np.std(expected)),
        "noise_std": NOISE,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
