"""Train a small Keras regression model and export it as a SavedModel (the stackml contract).

Run as ``python -m trainer.task --epochs=3 --batch_size=128 --learning_rate=0.01``.
Environment (set by the stackml runner): STACKML_MODEL_DIR (where the model goes),
STACKML_INPUT_DIR (optional CSV files: feature columns, then the target),
STACKML_CHECKPOINT_DIR (optional; training resumes from it after a restart).

Distributed: when TF_CONFIG names a cluster (a job with ``resources.workers`` > 1), every
replica runs this same module under ``tf.distribute.MultiWorkerMirroredStrategy``, with a
custom training loop (Keras 3's ``fit`` does not build under that strategy: its symbolic build
reduces a per-replica batch eagerly and fails); the chief checkpoints to
STACKML_CHECKPOINT_DIR and exports the model to STACKML_MODEL_DIR, the other replicas to
scratch directories (saving is a collective: every replica takes part).

When the cluster has parameter servers (``resources.parameter_servers`` > 0), it trains under
``tf.distribute.ParameterServerStrategy`` instead: the workers and parameter servers run a
``tf.distribute.Server`` until the job ends, and the chief coordinates (a
``ClusterCoordinator`` schedules each step on a free worker; the variables live on the parameter
servers), checkpoints and exports. Training is asynchronous: a worker that is lost only slows
it down, its steps go to the others, and a worker that comes back at the same address is used
again.

A side-car evaluator (``resources.evaluator``: TF_CONFIG's task type ``evaluator``) trains
nothing: it evaluates each checkpoint of the chief's as it arrives in its
STACKML_CHECKPOINT_DIR (the platform copies them there from the store), on fresh points of the
known function (or the last fifth of the CSV rows), reports ``eval_loss`` and ``eval_mae`` per
epoch, and ends after the last epoch's. It follows the distributed paths' checkpoints
(``tf.train.Checkpoint``), so it goes with ``resources.workers`` > 1.
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


def distribution() -> tuple[object | None, bool, str]:
    """(strategy, is_chief, what) from TF_CONFIG: MultiWorkerMirroredStrategy when it names a
    cluster of more than one task, ParameterServerStrategy when it has parameter servers (on
    the chief: a worker or a parameter server serves the cluster and never returns), else none
    (one process, the default strategy)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    tasks = sum(len(v) for v in (config.get("cluster") or {}).values())
    if tasks < 2:
        return None, True, "one process"
    import tensorflow as tf

    task = config.get("task") or {}
    is_chief = task.get("type") == "chief"
    if (config.get("cluster") or {}).get("ps"):
        return parameter_servers(config, task, tasks)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    what = (
        f"replica {task.get('type')}:{task.get('index')} of {tasks} "
        f"(MultiWorkerMirroredStrategy, {strategy.num_replicas_in_sync} replicas in sync)"
    )
    return strategy, is_chief, what


def parameter_servers(config: dict, task: dict, tasks: int) -> tuple[object, bool, str]:
    """ParameterServerStrategy: the chief's strategy; a worker or parameter server starts its
    server and serves the cluster until its process is stopped (it never returns)."""
    import tensorflow as tf

    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")  # as TensorFlow's guide asks
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = config["cluster"]
    what = (
        f"replica {task.get('type')}:{task.get('index')} of {tasks} (ParameterServerStrategy, "
        f"{len(cluster.get('worker') or [])} workers, {len(cluster['ps'])} parameter servers)"
    )
    if resolver.task_type in ("worker", "ps"):
        server = tf.distribute.Server(
            resolver.cluster_spec(),
            job_name=resolver.task_type,
            task_index=resolver.task_id,
            protocol=resolver.rpc_layer or "grpc",
            start=True,
        )
        print(f"trainer: {what}: serving the cluster", flush=True)
        server.join()  # until the job ends (the platform stops it)
        raise SystemExit(0)
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    return strategy, True, what


def train_parameter_servers(strategy, x, y, args: argparse.Namespace) -> object:
    """ParameterServerStrategy, on the chief (the coordinator): each step runs on whichever
    worker is free, on a batch of its own dataset; the variables live on the parameter servers.
    A checkpoint after every epoch, as under MultiWorkerMirroredStrategy. Returns the model."""
    import tempfile

    import tensorflow as tf

    from trainer.metrics import emit

    tf.get_logger().setLevel("ERROR")  # not a warning per epoch that the saver retraces
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        model = build_model(x.shape[1], args.learning_rate)
        optimizer = model.optimizer
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

    def dataset_fn(_context=None):
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=SEED)
            .batch(args.batch_size, drop_remainder=True)
            .repeat()
        )

    batches = iter(coordinator.create_per_worker_dataset(dataset_fn))
    ckpt_dir = os.environ.get("STACKML_CHECKPOINT_DIR") or tempfile.mkdtemp()
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
    # every shard is read and written by the chief, into its own directory: each parameter
    # server would otherwise write its variables on its own disk, which no one else sees
    on_chief = tf.train.CheckpointOptions(experimental_io_device="/job:chief/replica:0/task:0")
    latest = tf.train.latest_checkpoint(ckpt_dir)
    if latest:
        ckpt.restore(latest, options=on_chief)
        print(f"trainer: resuming from {ckpt_dir} after epoch {int(epoch.numpy())}", flush=True)
    saves = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=2)

    @tf.function
    def train_step(iterator):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                loss = tf.reduce_mean(tf.square(pred - yb))
                mae = tf.reduce_mean(tf.abs(pred - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss, mae

        xb, yb = next(iterator)
        return strategy.run(replica_step, args=(xb, yb))

    steps = max(1, len(x) // args.batch_size)
    for e in range(int(epoch.numpy()), args.epochs):
        started = time.monotonic()
        results = [coordinator.schedule(train_step, args=(batches,)) for _ in range(steps)]
        coordinator.join()
        values = [r.fetch() for r in results]
        loss = float(np.mean([v[0] for v in values]))
        mae = float(np.mean([v[1] for v in values]))
        epoch.assign(e + 1)
        saves.save(options=on_chief)
        seconds = time.monotonic() - started
        print(
            f"Epoch {e + 1}/{args.epochs} - {seconds:.1f}s - loss: {loss:.4f} - mae: {mae:.4f}",
            flush=True,
        )
        emit({"loss": loss, "mae": mae, "epoch_seconds": seconds}, epoch=e + 1)
    # the variables live on the parameter servers: export a local copy of the trained model
    local = build_model(x.shape[1], args.learning_rate)
    local.set_weights([v.numpy() for v in model.weights])
    return local


def train_distributed(strategy, is_chief: bool, x, y, args: argparse.Namespace) -> object:
    """MultiWorkerMirroredStrategy, a custom loop: each global batch is split between the
    replicas (the dataset is sharded by data), the gradients all-reduced; a checkpoint after
    every epoch (tf.train.Checkpoint: the model, the optimizer, the epoch), from which a
    restarted cluster resumes. Returns the model."""
    import tempfile

    import tensorflow as tf

    from trainer.metrics import emit

    with strategy.scope():
        model = build_model(x.shape[1], args.learning_rate)
        optimizer = model.optimizer
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=SEED)
        .batch(args.batch_size, drop_remainder=True)
    )
    batches = strategy.experimental_distribute_dataset(data)
    ckpt_dir = os.environ.get("STACKML_CHECKPOINT_DIR") or tempfile.mkdtemp()
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
    latest = tf.train.latest_checkpoint(ckpt_dir)
    if latest:
        ckpt.restore(latest)
        print(f"trainer: resuming from {ckpt_dir} after epoch {int(epoch.numpy())}", flush=True)
    # every replica saves (a collective); only the chief's directory is synced and restored
    saves = tf.train.CheckpointManager(
        ckpt, ckpt_dir if is_chief else tempfile.mkdtemp(), max_to_keep=2
    )

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                per_row = tf.reduce_mean(tf.square(pred - yb), axis=-1)
                loss = tf.nn.compute_average_loss(per_row, global_batch_size=args.batch_size)
                mae = tf.nn.compute_average_loss(
                    tf.reduce_mean(tf.abs(pred - yb), axis=-1), global_batch_size=args.batch_size
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss, mae

        loss, mae = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", mae, axis=None)

    for e in range(int(epoch.numpy()), args.epochs):
        started, total, total_mae, steps = time.monotonic(), 0.0, 0.0, 0
        for batch in batches:
            loss, mae = train_step(batch)
            total, total_mae, steps = total + float(loss), total_mae + float(mae), steps + 1
        epoch.assign(e + 1)
        saves.save()
        seconds = time.monotonic() - started
        if is_chief:
            print(
                f"Epoch {e + 1}/{args.epochs} - {seconds:.1f}s - "
                f"loss: {total / steps:.4f} - mae: {total_mae / steps:.4f}",
                flush=True,
            )
        # every replica reports (the job's metrics are the chief's; a worker's are its own)
        emit(
            {"loss": total / steps, "mae": total_mae / steps, "epoch_seconds": seconds}, epoch=e + 1
        )
    return model


def side_car_evaluator(args: argparse.Namespace) -> int:
    """TF_CONFIG's evaluator: each checkpoint of the chief's, as it arrives, evaluated on
    points the training never saw; ends after the last epoch's."""
    import tensorflow as tf

    from trainer.metrics import emit

    x, y, source = load_data(args.rows)
    if source.startswith("synthetic"):  # fresh points of the known function, without noise
        x = np.random.default_rng(SEED + 2).normal(size=(1000, x.shape[1])).astype("float32")
        y = target(x)
    else:
        x, y = x[-max(1, len(x) // 5) :], y[-max(1, len(y) // 5) :]
    model = build_model(x.shape[1], args.learning_rate)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = tf.train.Checkpoint(model=model, epoch=epoch)
    ckpt_dir = os.environ["STACKML_CHECKPOINT_DIR"]
    print(f"trainer: side-car evaluator on {len(x)} rows: waiting for checkpoints", flush=True)
    for path in tf.train.checkpoints_iterator(ckpt_dir, min_interval_secs=0.5):
        ckpt.restore(path).expect_partial()
        pred = model(x, training=False).numpy()
        loss, mae = float(np.mean((pred - y) ** 2)), float(np.mean(np.abs(pred - y)))
        done = int(epoch.numpy())
        print(f"Evaluation after epoch {done}: loss: {loss:.4f} - mae: {mae:.4f}", flush=True)
        emit({"eval_loss": loss, "eval_mae": mae}, epoch=done)
        if done >= args.epochs:
            break
    return 0


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

    task = (json.loads(os.environ.get("TF_CONFIG") or "{}").get("task")) or {}
    if task.get("type") == "evaluator":
        return side_car_evaluator(args)
    strategy, is_chief, what = distribution()
    print(f"trainer: {what}", flush=True)

    import keras

    from trainer.metrics import StackMLMetrics

    keras.utils.set_random_seed(SEED)
    x, y, source = load_data(args.rows)
    print(f"trainer: {len(x)} rows x {x.shape[1]} features from {source}", flush=True)
    if strategy is not None and "ParameterServerStrategy" in what:
        model = train_parameter_servers(strategy, x, y, args)
        export(model, model_dir, started)
        return 0
    if strategy is not None:
        model = train_distributed(strategy, is_chief, x, y, args)
        export(model, model_dir if is_chief else None, started)
        return 0

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
    export(model, model_dir, started)
    return 0


def export(model, model_dir: str | None, started: float) -> None:
    """The SavedModel into model_dir; None (a replica other than the chief): into a scratch
    directory, since every replica takes part in saving and only the chief's copy is kept."""
    import tempfile

    if model_dir is not None:
        model.export(model_dir, verbose=False)
        print(
            f"trainer: model exported to {model_dir} in {time.monotonic() - started:.1f}s",
            flush=True,
        )
        return
    with tempfile.TemporaryDirectory() as scratch:
        model.export(scratch, verbose=False)
    print(f"trainer: done in {time.monotonic() - started:.1f}s (not the chief)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
