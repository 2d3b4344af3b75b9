"""service.domain.savedmodel on synthetic and hostile input: the wire format is encoded here by
hand (TensorFlow is not imported by the platform; the real-SavedModel comparison with TF's own
view is in tests/integration/test_registry_savedmodel.py)."""

from __future__ import annotations

import random

import pytest

from service.domain import savedmodel
from service.domain.savedmodel import SavedModelError, read_signature, signature_names


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def shape(dims: list[int] | None) -> bytes:
    if dims is None:
        return field(3, 1)
    return b"".join(field(2, field(1, d)) for d in dims)


def tensor(dtype: int, dims: list[int] | None) -> bytes:
    return field(1, b"x:0") + field(2, dtype) + field(3, shape(dims))


def signature(inputs: dict[str, bytes], outputs: dict[str, bytes], method: str) -> bytes:
    body = b"".join(field(1, field(1, k.encode()) + field(2, v)) for k, v in inputs.items())
    body += b"".join(field(2, field(1, k.encode()) + field(2, v)) for k, v in outputs.items())
    return body + field(3, method.encode())


def saved_model(sigs: dict[str, bytes], tags: tuple[str, ...] = ("serve",)) -> bytes:
    meta_info = b"".join(field(4, t.encode()) for t in tags)
    graph = field(1, meta_info) + field(2, b"\x0a\x00" * 50)  # a graph_def, skipped
    graph += b"".join(field(5, field(1, k.encode()) + field(2, v)) for k, v in sigs.items())
    return field(1, 1) + field(2, graph)


GOOD = saved_model(
    {
        "serving_default": signature(
            {"features": tensor(1, [-1, 20]), "text": tensor(7, None)},
            {"output_0": tensor(1, [-1, 1])},
            "tensorflow/serving/predict",
        ),
        "other": signature({}, {}, "tensorflow/serving/classify"),
    }
)


def test_reads_the_serving_default_signature() -> None:
    assert read_signature(GOOD) == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {
            "features": {"dtype": "DT_FLOAT", "shape": [-1, 20]},
            "text": {"dtype": "DT_STRING", "shape": None},
        },
        "outputs": {"output_0": {"dtype": "DT_FLOAT", "shape": [-1, 1]}},
    }
    assert signature_names(GOOD) == ["other", "serving_default"]
    assert read_signature(GOOD, "other")["method_name"] == "tensorflow/serving/classify"


def test_picks_the_graph_tagged_serve() -> None:
    train = saved_model({"serving_default": signature({}, {}, "train")}, tags=("train",))
    serve = saved_model({"serving_default": signature({}, {}, "serve-me")})
    assert read_signature(train + serve)["method_name"] == "serve-me"
    with pytest.raises(SavedModelError, match="no meta graph tagged 'serve'"):
        read_signature(train)


def test_missing_signature_names_what_there_is() -> None:
    only = saved_model({"predict": signature({}, {}, "m")})
    with pytest.raises(
        SavedModelError, match=r"no 'serving_default' signature \(it has: predict\)"
    ):
        read_signature(only)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"\x12", "truncated varint"),
        (b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than 10 bytes"),
        (b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "larger than 64 bits"),
        (b"\x12\x80\x80\x80\x80\x10abc", "runs past"),
        (b"\x0b", "wire type 3"),
        (b"\x00\x00", "field number 0"),
        (b"\x11abc", "truncated fixed64"),
        (b"\x15ab", "truncated fixed32"),
        (field(2, field(1, 5)), "meta_info_def has wire type 0, expected 2"),
        (field(1, 1), "no meta graph"),
        (field(2, 7), "SavedModel.meta_graphs has wire type 0"),
    ],
)
def test_malformed_input_is_a_typed_error(data: bytes, message: str) -> None:
    with pytest.raises(SavedModelError, match=message):
        read_signature(data)


def test_every_truncation_is_a_typed_error_or_a_clean_answer() -> None:
    for cut in range(len(GOOD)):
        try:
            read_signature(GOOD[:cut])
        except SavedModelError:
            pass
    # cut inside the meta graph: the graph's length runs past the end
    with pytest.raises(SavedModelError, match="runs past"):
        read_signature(GOOD[: len(GOOD) // 2])


def test_deep_nesting_is_skipped_not_recursed() -> None:
    nested = b""
    for _ in range(20_000):  # far deeper than Python's recursion limit
        nested = field(1, nested)
    sig = signature({"a": tensor(1, [2])}, {}, "m")
    data = saved_model({"serving_default": sig}) + field(99, nested)
    assert read_signature(data)["inputs"] == {"a": {"dtype": "DT_FLOAT", "shape": [2]}}


def test_non_utf8_names_are_a_typed_error() -> None:
    data = field(2, field(1, field(4, b"serve")) + field(5, field(1, b"\xff") + field(2, b"")))
    with pytest.raises(SavedModelError, match="not UTF-8"):
        read_signature(data)


def test_oversized_input_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(savedmodel, "MAX_BYTES", len(GOOD) - 1)
    with pytest.raises(SavedModelError, match="larger than"):
        read_signature(GOOD)


def test_too_many_dimensions_is_a_typed_error() -> None:
    data = saved_model({"serving_default": signature({"a": tensor(1, [1] * 10_001)}, {}, "m")})
    with pytest.raises(SavedModelError, match="too many dimensions"):
        read_signature(data)


def test_random_bytes_never_crash() -> None:
    rng = random.Random(9)
    for _ in range(3000):
        blob = bytearray(GOOD)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.3:
            blob = blob[: rng.randrange(len(blob))]
        try:
            sig = read_signature(bytes(blob))
        except SavedModelError:
            continue
        assert set(sig) == {"method_name", "inputs", "outputs"}
    for _ in range(2000):
        try:
            read_signature(rng.randbytes(rng.randint(1, 200)))
        except SavedModelError:
            pass
