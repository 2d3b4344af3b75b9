"""Train a small Keras regression model and export it as a SavedModel (the stackml contract).

Run as ``python -m trainer.task --epochs=3 --batch_size=128 --learning_rate=0.01``.
Environment (set by the stackml runner): STACKML_MODEL_DIR (where the model goes),
STACKML_INPUT_DIR (optional CSV files: feature columns, then the target),
STACKML_CHECKPOINT_DIR (optional; training resumes from it after a restart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SEED = 1234
N_FEATURES = 20
BIAS = 0.5
NOISE = 0.1  # standard deviation of the noise added to the synthetic targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer.task", description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=0.01)
    p.add_argument("--rows", type=int, default=10_000, help="rows of synthetic data")
    args, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"trainer: ignoring unknown arguments: {' '.join(unknown)}", flush=True)
    if args.epochs < 1 or args.batch_size < 1 or args.rows < 10 or args.learning_rate <= 0:
        p.error("epochs, batch_size must be >= 1, rows >= 10, learning_rate > 0")
    return args


def known_function() -> tuple[np.ndarray, float]:
    """The weights and bias of the function the synthetic data comes from: y = X·w + b.

    Fixed by the seed, so a test (or ``evaluate.py``) can compare a trained model's predictions
    with the function it was meant to learn on points it never saw."""
    w = np.random.default_rng(SEED).normal(size=(N_FEATURES, 1)).astype("float32")
    return w, BIAS


def target(x: np.ndarray) -> np.ndarray:
    """The known function, without noise, at the rows of ``x`` (shape [n, N_FEATURES])."""
    w, b = known_function()
    return (x.astype("float32") @ w + b).astype("float32")


def synthetic_data(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """y = X·w + b + noise (X ~ N(0, 1)), with a fixed seed: the same data on every run."""
    rng = np.random.default_rng(SEED + 1)
    x = rng.normal(size=(rows, N_FEATURES)).astype("float32")
    y = target(x) + NOISE * rng.normal(size=(rows, 1)).astype("float32")
    return x, y.astype("float32")


def csv_data(directory: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Every *.csv under the input directory: feature columns, then the target; header optional."""
    files = sorted(p for p in directory.rglob("*.csv") if p.is_file())
    if not files:
        return None
    blocks = []
    for path in files:
        with path.open() as fh:
            first = fh.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1  # a header row
        data = np.loadtxt(path, delimiter=",", skiprows=skip, dtype="float32", ndmin=2)
        blocks.append(data)
    widths = {b.shape[1] for b in blocks}
    if len(widths) != 1 or widths.pop() < 2:
        raise SystemExit("trainer: the CSV files need the same number (>= 2) of columns")
    table = np.concatenate(blocks)
    return table[:, :-1], table[:, -1:]


def load_data(rows: int) -> tuple[np.ndarray, np.ndarray, str]:
    input_dir = os.environ.get("STACKML_INPUT_DIR")
    if input_dir and Path(input_dir).is_dir() and any(Path(input_dir).iterdir()):
        found = csv_data(Path(input_dir))
        if found is not None:
            return found[0], found[1], f"CSV files under {input_dir}"
        print(f"trainer: no *.csv under {input_dir}; using synthetic data", flush=True)
    x, y = synthetic_data(rows)
    return x, y, f"synthetic data ({rows} x {N_FEATURES}, seed {SEED})"


def build_model(n_features: int, learning_rate: float):  # keras is imported late (slow)
    import keras

    inputs = keras.Input(shape=(n_features,), name="features")
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(1, name="prediction")(hidden)
    model = keras.Model(inputs, outputs, name="regression")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss="mse", metrics=["mae"]
    )
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = os.environ.get("STACKML_MODEL_DIR")
    if not model_dir:
        print("trainer: STACKML_MODEL_DIR is not set (where should the model go?)", flush=True)
        return 2
    started = time.monotonic()
    # before TensorFlow loads: no oneDNN banner, no C++ INFO lines in the job's log
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras

    from trainer.metrics import StackMLMetrics

    keras.utils.set_random_seed(SEED)
    x, y, source = load_data(args.rows)
    print(f"trainer: {len(x)} rows x {x.shape[1]} features from {source}", flush=True)

    callbacks: list = [StackMLMetrics()]
    initial_epoch = 0
    model = None
    ckpt_dir = os.environ.get("STACKML_CHECKPOINT_DIR")
    if ckpt_dir:
        ckpt = Path(ckpt_dir) / "model.keras"
        state = Path(ckpt_dir) / "state.json"
        if ckpt.exists() and state.exists():
            initial_epoch = int(json.loads(state.read_text())["epoch"])
            model = keras.models.load_model(ckpt)
            print(f"trainer: resuming from {ckpt} after epoch {initial_epoch}", flush=True)
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(str(ckpt)))
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, _logs: state.write_text(json.dumps({"epoch": epoch + 1}))
            )
        )
    if model is None:
        model = build_model(x.shape[1], args.learning_rate)

    if initial_epoch < args.epochs:
        model.fit(
            x,
            y,
            epochs=args.epochs,
            initial_epoch=initial_epoch,
            batch_size=args.batch_size,
            validation_split=0.2,
            shuffle=True,
            callbacks=callbacks,
            verbose=2,
        )
    model.export(model_dir, verbose=False)
    print(
        f"trainer: model exported to {model_dir} in {time.monotonic() - started:.1f}s", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
