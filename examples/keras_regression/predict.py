"""Load a SavedModel exported by the example trainer and predict three deterministic rows.

Usage: ``python predict.py MODEL_DIR`` — prints ``{"predictions": [...]}`` (TF Serving's shape).
The input name and width are read from the ``serving_default`` signature, not hard-coded.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python predict.py MODEL_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow loads: quiet
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(argv[0])
    signature = loaded.signatures["serving_default"]
    _args, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        print(f"expected one input, the signature has {sorted(kwargs)}", file=sys.stderr)
        return 1
    ((name, spec),) = kwargs.items()
    width = int(spec.shape[-1])
    rows = np.linspace(-1.0, 1.0, num=3 * width).reshape(3, width)
    outputs = signature(**{name: tf.constant(rows, dtype=spec.dtype)})
    result = outputs[sorted(outputs)[0]].numpy()
    print(json.dumps({"predictions": result.tolist()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
