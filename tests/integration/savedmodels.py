"""Builds the SavedModels the model-server tests serve. Run by the TensorFlow runtime's python:

    python savedmodels.py OUT_DIR

OUT_DIR/linear/<1,2>/   serving_default: x float32 [-1, 20] -> y = x @ w_v + b_v   (w_v: seeded)
OUT_DIR/multi/1/        serving_default: a float32 [-1, 2], n int32 [-1] -> total, twice
OUT_DIR/examples/1/     a TF1 SavedModel of tf.Example inputs: serving_default (classify),
                        "classify" and "regress" signatures over features f0, f1 (floats)
OUT_DIR/expected.json   the weights, so the tests compute the answers without TensorFlow
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

N = 20


def linear(out: Path, version: int) -> dict:
    rng = np.random.default_rng(version)
    w = rng.normal(size=(N, 1)).astype("float32")
    b = float(version) / 2

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(w)
            self.b = tf.Variable(b)

        @tf.function(input_signature=[tf.TensorSpec([None, N], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

    m = Linear()
    tf.saved_model.save(
        m, str(out / "linear" / str(version)), signatures={"serving_default": m.serve}
    )
    return {"w": w[:, 0].tolist(), "b": b}


def multi(out: Path) -> None:
    class Multi(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.float32, name="a"),
                tf.TensorSpec([None], tf.int32, name="n"),
            ]
        )
        def serve(self, a, n):
            return {"total": tf.reduce_sum(a, axis=1) * tf.cast(n, tf.float32), "twice": n * 2}

    m = Multi()
    tf.saved_model.save(m, str(out / "multi" / "1"), signatures={"serving_default": m.serve})


def examples(out: Path) -> dict:
    """classify: scores = softmax([f0, f1]) over classes ["neg", "pos"]; regress: f0 + 2*f1."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        feats = v1.io.parse_example(
            serialized,
            {
                "f0": v1.io.FixedLenFeature([1], tf.float32),
                "f1": v1.io.FixedLenFeature([1], tf.float32),
            },
        )
        logits = tf.concat([feats["f0"], feats["f1"]], axis=1)
        scores = tf.nn.softmax(logits)
        batch = tf.shape(scores)[0]
        classes = tf.tile(tf.constant([["neg", "pos"]]), [batch, 1])
        value = feats["f0"] + 2.0 * feats["f1"]
        sm = v1.saved_model
        info = sm.utils.build_tensor_info
        cls_sig = sm.signature_def_utils.build_signature_def(
            inputs={sm.signature_constants.CLASSIFY_INPUTS: info(serialized)},
            outputs={
                sm.signature_constants.CLASSIFY_OUTPUT_CLASSES: info(classes),
                sm.signature_constants.CLASSIFY_OUTPUT_SCORES: info(scores),
            },
            method_name=sm.signature_constants.CLASSIFY_METHOD_NAME,
        )
        reg_sig = sm.signature_def_utils.build_signature_def(
            inputs={sm.signature_constants.REGRESS_INPUTS: info(serialized)},
            outputs={sm.signature_constants.REGRESS_OUTPUTS: info(value)},
            method_name=sm.signature_constants.REGRESS_METHOD_NAME,
        )
        builder = sm.Builder(str(out / "examples" / "1"))
        builder.add_meta_graph_and_variables(
            sess,
            [sm.tag_constants.SERVING],
            signature_def_map={
                "serving_default": cls_sig,
                "classify": cls_sig,
                "regress": reg_sig,
            },
        )
        builder.save()
    return {"classes": ["neg", "pos"]}


def main() -> None:
    out = Path(sys.argv[1])
    expected: dict[str, Any] = {"linear": {str(v): linear(out, v) for v in (1, 2)}}
    multi(out)
    expected["examples"] = examples(out)
    # the answers of the SavedModels called directly, for the server's answers to match
    rows = np.random.default_rng(99).normal(size=(3, N)).astype("float32")
    expected["rows"] = rows.tolist()
    for v in (1, 2):
        fn = tf.saved_model.load(str(out / "linear" / str(v))).signatures["serving_default"]
        expected["linear"][str(v)]["direct"] = fn(x=tf.constant(rows))["y"].numpy().tolist()
    ex = tf.saved_model.load(str(out / "examples" / "1"))
    feats = [{"f0": 1.0, "f1": 2.0}, {"f0": -0.5, "f1": 0.25}]
    serialized = [
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    k: tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
                    for k, v in f.items()
                }
            )
        ).SerializeToString()
        for f in feats
    ]
    got = ex.signatures["classify"](inputs=tf.constant(serialized))
    reg = ex.signatures["regress"](inputs=tf.constant(serialized))
    expected["examples"].update(
        features=feats,
        scores=got["scores"].numpy().tolist(),
        regress=reg["outputs"].numpy()[:, 0].tolist(),
    )
    (out / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main()
