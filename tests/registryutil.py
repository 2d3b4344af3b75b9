"""Real SavedModels for the registry tests, built by the TensorFlow runtime's python (the
platform itself never imports TensorFlow), with what TensorFlow itself reports of them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

RUNTIME_ROOT = Path(os.environ.get("STACKML_TEST_RUNTIME_ROOT", "/var/cache/stackml/runtimes"))

# TF's view of one SavedModel directory (`view(path)`, for the scripts below):
# tf.saved_model.load for the structured signature, TF's own protobuf classes for the method name
_VIEW_DEFS = r"""
def dtype(spec):
    return types_pb2.DataType.Name(spec.dtype.as_datatype_enum)

def view(path):
    proto = saved_model_pb2.SavedModel()
    with open(path + "/saved_model.pb", "rb") as f:
        proto.ParseFromString(f.read())
    (graph,) = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
    sig = tf.saved_model.load(path).signatures["serving_default"]
    _, kwargs = sig.structured_input_signature
    def shape(s):
        return None if s.shape.rank is None else [-1 if d is None else d for d in s.shape.as_list()]
    return {
        "method_name": graph.signature_def["serving_default"].method_name,
        "inputs": {k: {"dtype": dtype(v), "shape": shape(v)} for k, v in kwargs.items()},
        "outputs": {
            k: {"dtype": dtype(v), "shape": shape(v)} for k, v in sig.structured_outputs.items()
        },
    }
"""

_VIEW = (
    r"""
import json, sys
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
"""
    + _VIEW_DEFS
    + r"""
print("TFVIEW " + json.dumps(view(sys.argv[1])))
"""
)

# builds two SavedModels and prints TF's view of their serving_default signatures
_BUILD = (
    r"""
import json, sys
import numpy as np
import tensorflow as tf
import keras
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

out = sys.argv[1]
# 1. the example's export path: a Keras model, model.export (as examples/keras_regression)
inp = keras.Input(shape=(20,), name="features")
h = keras.layers.Dense(8, activation="relu")(inp)
model = keras.Model(inp, keras.layers.Dense(1)(h))
model.compile(optimizer="adam", loss="mse")
model.fit(np.zeros((8, 20), "float32"), np.zeros((8, 1), "float32"), epochs=1, verbose=0)
model.export(out + "/keras", verbose=False)

# 2. a tf.Module: two inputs of other dtypes, an unknown rank, two outputs
class M(tf.Module):
    @tf.function(input_signature=[
        tf.TensorSpec([None, 3], tf.int64, name="ids"),
        tf.TensorSpec(None, tf.string, name="text"),
    ])
    def serve(self, ids, text):
        return {"total": tf.reduce_sum(ids, axis=1), "echo": text}

m = M()
tf.saved_model.save(m, out + "/module", signatures={"serving_default": m.serve})
"""
    + _VIEW_DEFS
    + r"""
print("TFVIEW " + json.dumps({"keras": view(out + "/keras"), "module": view(out + "/module")}))
"""
)


def runtime_python() -> Path:
    found = sorted(RUNTIME_ROOT.glob("tensorflow-*/bin/python"))
    if not found:
        raise AssertionError(
            f"no TensorFlow runtime under {RUNTIME_ROOT}: build it (make runtime, or run the e2e "
            "tier once); the registry's SavedModel tests need a real SavedModel"
        )
    return found[-1]


def build_savedmodels(where: Path) -> dict[str, Any]:
    """SavedModels at where/keras and where/module; returns TensorFlow's view of their
    serving_default signatures {"keras": {"method_name", "inputs", "outputs"}, "module": ...}
    (structured signatures from tf.saved_model.load, method_name from TF's own protobuf)."""
    return _run(_BUILD, where)


def tensorflow_view(model_dir: Path) -> dict[str, Any]:
    """What TensorFlow reports of the serving_default signature of the SavedModel at
    `model_dir` (same shape as the registry's signature)."""
    return _run(_VIEW, model_dir)


def _run(script: str, arg: Path) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [str(runtime_python()), "-c", script, str(arg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"TensorFlow failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TFVIEW "))
    view: dict[str, Any] = json.loads(line[len("TFVIEW ") :])
    return view
