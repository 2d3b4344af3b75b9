"""stackml model server: TensorFlow Serving's REST API, stdlib HTTP + TensorFlow.

Runs on a serving replica under the runtime's python, with the command line of
``tensorflow_model_server`` (so the runner starts either one the same way)::

    python model_server.py --rest_api_port=8501 --model_name=M --model_base_path=DIR

DIR holds TF Serving's layout, ``<version>/saved_model.pb`` (+ ``variables/``); every version
present is loaded at start (state LOADING, then AVAILABLE, or END with the load error) and warmed
with one predict of zeros when the signature's shapes allow it. Routes, as TF Serving's REST API:

    GET  /v1/models/M[/versions/V|/labels/L]             status
    GET  /v1/models/M[/versions/V|/labels/L]/metadata    signature defs
    POST /v1/models/M[/versions/V|/labels/L]:predict     {"instances": [...]} | {"inputs": ...}
    POST /v1/models/M[/versions/V|/labels/L]:classify    {"examples": [...], "context"?}
    POST /v1/models/M[/versions/V|/labels/L]:regress     idem

Errors are ``{"error": "<message>"}`` with TF Serving's status (400 bad input, 404 unknown
model/version). Labels: ``--version_labels=stable=1,canary=2`` (ours; TF Serving takes them from
its model config file). Keep-alive HTTP/1.1, Nagle off, one thread per connection.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MAX_REQUEST_BYTES = 16 << 20
IDLE_TIMEOUT = 120.0  # seconds a kept-alive connection may stay idle
PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
INIT_OP = "__saved_model_init_op"

ROUTE = re.compile(
    r"^/v1/models/(?P<model>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?$"
)


class ServingError(Exception):
    """An answer other than 200: ``{"error": message}`` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> ServingError:
    return ServingError(400, message)


# -- the model ---------------------------------------------------------------------------


class Version:
    """One version directory: its state, the loaded SavedModel, its signature defs."""

    def __init__(self, number: int, path: str) -> None:
        self.number = number
        self.path = path
        self.state = "START"
        self.error = ""
        self.loaded: Any = None
        self.signatures: dict[str, Any] = {}  # name -> concrete function
        self.sigdefs: dict[str, Any] = {}  # name -> SignatureDef proto

    def status(self) -> dict:
        code = "OK" if self.state != "END" or not self.error else "UNKNOWN"
        return {
            "version": str(self.number),
            "state": self.state,
            "status": {"error_code": code, "error_message": self.error},
        }

    def load(self) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.state = "LOADING"
        try:
            proto = saved_model_pb2.SavedModel()
            with open(os.path.join(self.path, "saved_model.pb"), "rb") as fh:
                proto.ParseFromString(fh.read())
            meta = proto.meta_graphs[0]
            self.sigdefs = {k: v for k, v in meta.signature_def.items() if k != INIT_OP}
            self.loaded = tf.saved_model.load(self.path)
            self.signatures = dict(self.loaded.signatures)
            self._warm_up()
        except Exception as e:  # noqa: BLE001 - a version that cannot load is reported
            self.state = "END"
            self.error = f"{type(e).__name__}: {e}"
            print(f"model_server: version {self.number} failed to load: {self.error}", flush=True)
            return
        self.state = "AVAILABLE"

    def _warm_up(self) -> None:
        """One predict of zeros through serving_default, when every input has a known shape
        but the batch dimension and a numeric dtype."""
        fn = self.signatures.get(DEFAULT_SIGNATURE)
        sigdef = self.sigdefs.get(DEFAULT_SIGNATURE)
        if fn is None or sigdef is None or sigdef.method_name != PREDICT:
            return
        import numpy as np

        feeds = {}
        for name, spec in input_specs(fn).items():
            dims = spec.shape.as_list() if spec.shape.rank is not None else None
            numeric = spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool
            if not dims or any(d is None for d in dims[1:]) or not numeric:
                return
            feeds[name] = np.zeros([1, *dims[1:]], dtype=spec.dtype.as_numpy_dtype)
        fn(**feeds)


def input_specs(fn: Any) -> dict[str, Any]:
    """name -> TensorSpec, from the concrete function's structured input signature."""
    args, kwargs = fn.structured_input_signature
    specs = dict(kwargs)
    if not specs and args:  # positional-only signatures are not callable by name
        raise bad("the signature takes positional inputs only")
    return specs


class Model:
    def __init__(self, name: str, base_path: str, labels: dict[str, int]) -> None:
        self.name = name
        self.base_path = base_path
        self.labels = labels
        self.versions: dict[int, Version] = {}
        for entry in sorted(os.listdir(base_path)):
            path = os.path.join(base_path, entry)
            if entry.isdigit() and os.path.isfile(os.path.join(path, "saved_model.pb")):
                self.versions[int(entry)] = Version(int(entry), path)
        for label, v in labels.items():
            if v not in self.versions:
                raise SystemExit(f"label {label} points at version {v}, which is not in DIR")

    def load_all(self) -> None:
        for number in sorted(self.versions):
            self.versions[number].load()

    def resolve(self, name: str, version: str | None, label: str | None) -> Version:
        """The version a request names (latest AVAILABLE when it names none)."""
        if name != self.name:
            spec = f"Specific({name}, {version})" if version else f"Latest({name})"
            raise ServingError(404, f"Servable not found for request: {spec}")
        if label is not None:
            if label not in self.labels:
                raise bad(f"Unrecognized servable version label: {label}")
            number = self.labels[label]
        elif version is not None:
            if not version.isdigit() or len(version) > 18:
                raise bad(f"Failed to convert version: {version} to numeric.")
            number = int(version)
        else:
            ready = [n for n, v in self.versions.items() if v.state == "AVAILABLE"]
            if not ready:
                raise ServingError(404, f"Servable not found for request: Latest({name})")
            number = max(ready)
        v = self.versions.get(number)
        if v is None or v.state != "AVAILABLE":
            raise ServingError(404, f"Servable not found for request: Specific({name}, {number})")
        return v

    def status(self, name: str, version: str | None, label: str | None) -> dict:
        if name != self.name:
            raise ServingError(404, f"Could not find any versions of model {name}")
        if label is not None:
            if label not in self.labels:
                raise bad(f"Unrecognized servable version label: {label}")
            chosen = [self.versions[self.labels[label]]]
        elif version is not None:
            if not version.isdigit() or len(version) > 18:
                raise bad(f"Failed to convert version: {version} to numeric.")
            v = self.versions.get(int(version))
            if v is None:
                raise ServingError(404, f"Could not find version {version} of model {name}")
            chosen = [v]
        else:
            if not self.versions:
                raise ServingError(404, f"Could not find any versions of model {name}")
            chosen = [self.versions[n] for n in sorted(self.versions, reverse=True)]
        return {"model_version_status": [v.status() for v in chosen]}


# -- JSON <-> tensors ---------------------------------------------------------------------


def _decode_b64(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise bad('a binary value must be {"b64": "<base64 string>"}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as e:
            raise bad(f"invalid base64 value: {e}") from e
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def to_tensor(name: str, value: Any, spec: Any) -> Any:
    """A JSON value as a numpy array of the input's dtype and a compatible shape; 400 else."""
    import numpy as np

    dtype = spec.dtype
    try:
        if dtype.name == "string":
            raw = np.asarray(_decode_b64(value), dtype=object)
            if raw.size and not all(isinstance(x, str | bytes) for x in raw.flat):
                raise bad(f"input {name} expects strings (DT_STRING)")
            arr = raw
        else:
            raw = np.asarray(value)
            if raw.dtype == object or raw.dtype.kind in "USV":
                raise bad(f"input {name} expects {_dt(dtype)} values, got non-numeric data")
            if dtype.is_bool and raw.size and raw.dtype.kind != "b":
                raise bad(f"input {name} expects booleans (DT_BOOL)")
            if dtype.is_integer and raw.size and raw.dtype.kind not in "iub":
                raise bad(f"input {name} expects integers ({_dt(dtype)}), got {raw.dtype.name}")
            arr = raw.astype(dtype.as_numpy_dtype)
    except ServingError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise bad(f"input {name}: {e}") from e
    if not spec.shape.is_compatible_with(arr.shape):
        raise bad(
            f"input {name} has shape {list(arr.shape)}, the signature expects "
            f"{spec.shape.as_list() if spec.shape.rank is not None else 'any'}"
        )
    return arr


def _dt(dtype: Any) -> str:
    _dtype_names()
    return _DTYPE_NAMES.get(dtype.as_datatype_enum, dtype.name)


def _error_text(e: Any) -> str:
    """A TF error's message without the Python traceback of where the graph was built."""
    text = str(getattr(e, "message", e)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("  File ")]
    lines = [ln for ln in lines if not ln.startswith(("Detected at node", "Graph execution"))]
    return "\n".join(lines) or text


def to_json(arr: Any) -> Any:
    import numpy as np

    a = np.asarray(arr)
    if a.dtype == object or a.dtype.kind == "S":
        return _bytes_json(a.tolist())
    return a.tolist()


def _bytes_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_bytes_json(x) for x in v]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(v).decode()}
    return v


def _call(fn: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    try:
        out = fn(**feeds)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
        raise bad(_error_text(e)) from e
    except tf.errors.OpError as e:
        raise ServingError(500, _error_text(e)) from e
    if not isinstance(out, dict):
        out = {"output_0": out}
    return {k: v.numpy() for k, v in out.items()}


def _signature(v: Version, body: dict, method: str) -> tuple[Any, Any]:
    name = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise bad("'signature_name' must be a string")
    name = name or DEFAULT_SIGNATURE
    fn = v.signatures.get(name)
    sigdef = v.sigdefs.get(name)
    if fn is None or sigdef is None:
        raise bad(f'Serving signature name: "{name}" not found in signature def')
    if method != PREDICT and sigdef.method_name != method:
        kind = "classification" if method == CLASSIFY else "regression"
        raise bad(
            f"Expected {kind} signature method_name to be {method}. Was: {sigdef.method_name}"
        )
    return fn, sigdef


def predict(v: Version, body: dict) -> dict:
    fn, _ = _signature(v, body, PREDICT)
    specs = input_specs(fn)
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows and has_cols:
        raise bad("Not both 'instances' and 'inputs' can be specified in the request")
    if not has_rows and not has_cols:
        raise bad("Missing 'inputs' or 'instances' key")
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise bad("'instances' must be a non-empty JSON list")
        columns: dict[str, list] = {n: [] for n in specs}
        for i, row in enumerate(rows):
            if isinstance(row, dict) and not (len(specs) == 1 and set(row) == {"b64"}):
                if set(row) != set(specs):
                    raise bad(
                        f"instance {i} has inputs {sorted(row)}, the signature takes "
                        f"{sorted(specs)}"
                    )
                for n in specs:
                    columns[n].append(row[n])
            elif len(specs) == 1:
                columns[next(iter(specs))].append(row)
            else:
                raise bad(f"instance {i} must be an object naming the inputs {sorted(specs)}")
        feeds = {n: to_tensor(n, columns[n], specs[n]) for n in specs}
        out = _call(fn, feeds)
        batch = len(rows)
        for k, val in out.items():
            if not val.shape or val.shape[0] != batch:
                raise bad(f"output {k} has no batch dimension of {batch}: use the 'inputs' format")
        names = sorted(out)
        if len(names) == 1:
            return {"predictions": to_json(out[names[0]])}
        cols = {k: to_json(out[k]) for k in names}
        return {"predictions": [{k: cols[k][i] for k in names} for i in range(batch)]}
    value = body["inputs"]
    if isinstance(value, dict) and not (len(specs) == 1 and set(value) == {"b64"}):
        if set(value) != set(specs):
            raise bad(f"'inputs' names {sorted(value)}, the signature takes {sorted(specs)}")
        feeds = {n: to_tensor(n, value[n], specs[n]) for n in specs}
    elif len(specs) == 1:
        n = next(iter(specs))
        feeds = {n: to_tensor(n, value, specs[n])}
    else:
        raise bad(f"'inputs' must be an object naming the inputs {sorted(specs)}")
    out = _call(fn, feeds)
    if len(out) == 1:
        return {"outputs": to_json(next(iter(out.values())))}
    return {"outputs": {k: to_json(val) for k, val in sorted(out.items())}}


def _feature(name: str, value: Any) -> Any:
    import tensorflow as tf

    values = value if isinstance(value, list) else [value]
    if not values:
        return tf.train.Feature(float_list=tf.train.FloatList(value=[]))
    if all(isinstance(x, bool) for x in values) or all(
        isinstance(x, int) and not isinstance(x, bool) for x in values
    ):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in values]))
    if all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in values]))
    if all(isinstance(x, str | dict) for x in values):
        raw = [x.encode() if isinstance(x, str) else _decode_b64(x) for x in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=raw))
    raise bad(f"feature {name}: values must be all numbers or all strings")


def _examples(body: dict) -> list[bytes]:
    import tensorflow as tf

    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise bad("'examples' must be a non-empty JSON list of objects")
    context = body.get("context", {})
    if not isinstance(context, dict):
        raise bad("'context' must be a JSON object")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise bad(f"example {i} must be a JSON object of features")
        clash = set(ex) & set(context)
        if clash:
            raise bad(f"example {i} repeats context features {sorted(clash)}")
        feats = {k: _feature(k, v) for k, v in {**context, **ex}.items()}
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out


def _example_feed(fn: Any, serialized: list[bytes]) -> dict[str, Any]:
    import numpy as np

    specs = input_specs(fn)
    if len(specs) != 1:
        raise bad("a classify/regress signature takes one input of serialized tf.Examples")
    return {next(iter(specs)): np.asarray(serialized, dtype=object)}


def classify(v: Version, body: dict) -> dict:
    fn, _ = _signature(v, body, CLASSIFY)
    serialized = _examples(body)
    out = _call(fn, _example_feed(fn, serialized))
    scores = out.get("scores")
    classes = out.get("classes")
    result = []
    for i in range(len(serialized)):
        row_scores = [] if scores is None else to_json(scores[i])
        row_classes = [] if classes is None else to_json(classes[i])
        n = max(len(row_scores), len(row_classes))
        result.append(
            [
                [
                    row_classes[j] if j < len(row_classes) else "",
                    row_scores[j] if j < len(row_scores) else 0.0,
                ]
                for j in range(n)
            ]
        )
    return {"result": result}


def regress(v: Version, body: dict) -> dict:
    fn, _ = _signature(v, body, REGRESS)
    serialized = _examples(body)
    out = _call(fn, _example_feed(fn, serialized))
    values = out.get("outputs")
    if values is None:
        raise ServingError(500, "the regression signature has no 'outputs' tensor")
    return {"result": [float(x) for x in values.reshape(len(serialized), -1)[:, 0]]}


# -- metadata ------------------------------------------------------------------------------

_DTYPE_NAMES: dict[int, str] = {}


def _dtype_names() -> None:
    if not _DTYPE_NAMES:
        from tensorflow.core.framework import types_pb2

        _DTYPE_NAMES.update({v: k for k, v in types_pb2.DataType.items()})


def _tensor_info(info: Any) -> dict:
    _dtype_names()
    shape = info.tensor_shape
    return {
        "dtype": _DTYPE_NAMES.get(info.dtype, str(info.dtype)),
        "tensor_shape": {
            "dim": [{"size": str(d.size), "name": d.name} for d in shape.dim],
            "unknown_rank": bool(shape.unknown_rank),
        },
        "name": info.name,
    }


def metadata(model: Model, v: Version) -> dict:
    sigs = {
        name: {
            "inputs": {k: _tensor_info(t) for k, t in sorted(s.inputs.items())},
            "outputs": {k: _tensor_info(t) for k, t in sorted(s.outputs.items())},
            "method_name": s.method_name,
            "defaults": {},
        }
        for name, s in sorted(v.sigdefs.items())
    }
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(v.number)},
        "metadata": {"signature_def": {"signature_def": sigs}},
    }


# -- HTTP ----------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server_version = "stackml-model-server/1"
    model: Model
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def log_message(self, format: str, *args: Any) -> None:
        return  # no access log on the request path

    def _answer(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, allow_nan=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: int, message: str) -> None:
        self._answer(status, {"error": message})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise ServingError(411, "chunked request bodies are not supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            self.close_connection = True
            raise bad(f"invalid Content-Length: {length!r}")
        n = int(length)
        if n > self.max_request_bytes:
            self.close_connection = True  # the body stays unread: the connection cannot be reused
            raise ServingError(
                413, f"request body of {n} bytes exceeds the limit of {self.max_request_bytes}"
            )
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise bad("request body shorter than its Content-Length")
        return data

    def _dispatch(self, method: str) -> None:
        try:
            try:
                body = self._read_body() if method in ("POST", "PUT") else b""
                self._answer(200, self._route(method, self.path.split("?", 1)[0], body))
            except ServingError as e:
                self._fail(e.status, e.message)
            except Exception as e:  # noqa: BLE001 - never die on a request
                self._fail(500, f"{type(e).__name__}: {e}")
        except OSError:
            self.close_connection = True  # the client went away mid-answer

    def _route(self, method: str, path: str, body: bytes) -> dict:
        m = ROUTE.match(path)
        if (
            m is None
            or (method == "POST") != (m["verb"] is not None)
            or method
            not in (
                "GET",
                "POST",
            )
        ):
            if path.startswith("/v1/"):
                raise bad(f"Malformed request: {method} {path}")
            raise ServingError(404, f"Not found: {method} {path}")
        model = self.model
        if m["verb"] is None and m["metadata"] is None:
            return model.status(m["model"], m["version"], m["label"])
        v = model.resolve(m["model"], m["version"], m["label"])
        if m["metadata"]:
            return metadata(model, v)
        try:
            req = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"JSON Parse error: {e}") from e
        if not isinstance(req, dict):
            raise bad("JSON Value: request body is not a JSON object")
        if m["verb"] == "predict":
            return predict(v, req)
        if m["verb"] == "classify":
            return classify(v, req)
        return regress(v, req)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def parse_labels(text: str) -> dict[str, int]:
    labels: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, sep, number = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", name) or not number.isdigit():
            raise SystemExit(f"--version_labels: {part!r} is not LABEL=VERSION")
        labels[name] = int(number)
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="TF Serving's REST API over TensorFlow (stackml)")
    p.add_argument("--rest_api_port", type=int, required=True)
    p.add_argument("--rest_api_bind", default="0.0.0.0")
    p.add_argument("--model_name", required=True)
    p.add_argument("--model_base_path", required=True)
    p.add_argument("--port", type=int, default=0, help="gRPC port: accepted, not served")
    p.add_argument("--version_labels", default="", help="LABEL=VERSION,... (ours)")
    p.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    args = p.parse_args(argv)
    if not os.path.isdir(args.model_base_path):
        p.error(f"--model_base_path {args.model_base_path} is not a directory")
    model = Model(args.model_name, args.model_base_path, parse_labels(args.version_labels))
    if not model.versions:
        p.error(f"no <version>/saved_model.pb under {args.model_base_path}")
    Handler.model = model
    Handler.max_request_bytes = args.max_request_bytes
    server = Server((args.rest_api_bind, args.rest_api_port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(
        f"model_server: {args.model_name} on {args.rest_api_bind}:{server.server_address[1]}, "
        f"versions {sorted(model.versions)}",
        flush=True,
    )
    t0 = time.monotonic()
    model.load_all()
    states = {n: v.state for n, v in model.versions.items()}
    print(f"model_server: loaded in {time.monotonic() - t0:.1f}s: {states}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
