"""Read a SavedModel's `serving_default` signature from `saved_model.pb`, without TensorFlow.

The API and the workers do not import TensorFlow, and `google.protobuf` cannot decode a
SavedModel without TF's generated descriptors. So this is a small reader of the protobuf wire
format for exactly the fields the registry needs:

    SavedModel.meta_graphs = 2                      (repeated MetaGraphDef)
      MetaGraphDef.meta_info_def = 1 -> MetaInfoDef.tags = 4   (the "serve" graph)
      MetaGraphDef.signature_def = 5                (map<string, SignatureDef>)
        SignatureDef.inputs = 1, outputs = 2        (map<string, TensorInfo>)
        SignatureDef.method_name = 3
          TensorInfo.dtype = 2, tensor_shape = 3
            TensorShapeProto.dim = 2 {size = 1}, unknown_rank = 3

Everything else (the graph, the object graph, assets) is skipped by its length, never parsed,
so nesting in the rest of the file cannot make the reader recurse. Input is bounded by
MAX_BYTES; anything malformed raises SavedModelError (a ValueError), never anything else.
"""

from __future__ import annotations

from typing import Any

MAX_BYTES = 256 * 1024 * 1024
# signatures per graph / tensors per signature / dims per shape: more is not a real model
MAX_ENTRIES = 10_000
SERVING_DEFAULT = "serving_default"
SERVE_TAG = "serve"

# tensorflow/core/framework/types.proto
DTYPES: dict[int, str] = {
    0: "DT_INVALID",
    1: "DT_FLOAT",
    2: "DT_DOUBLE",
    3: "DT_INT32",
    4: "DT_UINT8",
    5: "DT_INT16",
    6: "DT_INT8",
    7: "DT_STRING",
    8: "DT_COMPLEX64",
    9: "DT_INT64",
    10: "DT_BOOL",
    11: "DT_QINT8",
    12: "DT_QUINT8",
    13: "DT_QINT32",
    14: "DT_BFLOAT16",
    15: "DT_QINT16",
    16: "DT_QUINT16",
    17: "DT_UINT16",
    18: "DT_COMPLEX128",
    19: "DT_HALF",
    20: "DT_RESOURCE",
    21: "DT_VARIANT",
    22: "DT_UINT32",
    23: "DT_UINT64",
    24: "DT_FLOAT8_E5M2",
    25: "DT_FLOAT8_E4M3FN",
    29: "DT_INT4",
    30: "DT_UINT4",
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class SavedModelError(ValueError):
    """saved_model.pb is not a SavedModel we can read (truncated, malformed, too large, or
    without a `serve` graph / `serving_default` signature). The message says which."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    for _ in range(10):
        if pos >= end:
            raise SavedModelError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >= 1 << 64:
                raise SavedModelError("varint larger than 64 bits")
            return result, pos
        shift += 7
    raise SavedModelError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> list[tuple[int, int, Any]]:
    """The (field number, wire type, value) of one message: an int for varint/fixed fields,
    a memoryview for length-delimited ones (not parsed further here)."""
    out: list[tuple[int, int, Any]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if number == 0:
            raise SavedModelError("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            if pos + 8 > end:
                raise SavedModelError("truncated fixed64")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == _I32:
            if pos + 4 > end:
                raise SavedModelError("truncated fixed32")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise SavedModelError("length-delimited field runs past its message")
            value = buf[pos : pos + length]
            pos += length
        else:  # groups (3, 4) are not in any of these messages; 6, 7 do not exist
            raise SavedModelError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _want(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise SavedModelError(f"{what} has wire type {wire}, expected {expected}")


def _string(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SavedModelError(f"{what} is not UTF-8") from e


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _map_entry(buf: memoryview, what: str) -> tuple[str, memoryview]:
    key, value = "", memoryview(b"")
    for number, wire, v in _fields(buf):
        if number == 1:
            _want(wire, _LEN, f"{what} key")
            key = _string(v, f"{what} key")
        elif number == 2:
            _want(wire, _LEN, f"{what} value")
            value = v
    return key, value


def _shape(buf: memoryview) -> list[int] | None:
    dims: list[int] = []
    unknown_rank = False
    for number, wire, v in _fields(buf):
        if number == 2:
            _want(wire, _LEN, "TensorShapeProto.dim")
            if len(dims) >= MAX_ENTRIES:
                raise SavedModelError("too many dimensions")
            size = 0
            for n2, w2, v2 in _fields(v):
                if n2 == 1:
                    _want(w2, _VARINT, "Dim.size")
                    size = _int64(v2)
            dims.append(size)
        elif number == 3:
            _want(wire, _VARINT, "TensorShapeProto.unknown_rank")
            unknown_rank = bool(v)
    return None if unknown_rank else dims


def _tensor_info(buf: memoryview) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": "DT_INVALID", "shape": []}
    for number, wire, v in _fields(buf):
        if number == 2:
            _want(wire, _VARINT, "TensorInfo.dtype")
            info["dtype"] = DTYPES.get(v, f"DT_UNKNOWN_{v}")
        elif number == 3:
            _want(wire, _LEN, "TensorInfo.tensor_shape")
            info["shape"] = _shape(v)
    return info


def _signature(buf: memoryview) -> dict[str, Any]:
    sig: dict[str, Any] = {"method_name": "", "inputs": {}, "outputs": {}}
    for number, wire, v in _fields(buf):
        if number in (1, 2):
            side = "inputs" if number == 1 else "outputs"
            _want(wire, _LEN, f"SignatureDef.{side}")
            if len(sig[side]) >= MAX_ENTRIES:
                raise SavedModelError(f"too many {side}")
            key, value = _map_entry(v, f"SignatureDef.{side}")
            sig[side][key] = _tensor_info(value)
        elif number == 3:
            _want(wire, _LEN, "SignatureDef.method_name")
            sig["method_name"] = _string(v, "SignatureDef.method_name")
    return sig


def _meta_graph(buf: memoryview) -> tuple[set[str], dict[str, memoryview]]:
    tags: set[str] = set()
    signatures: dict[str, memoryview] = {}
    for number, wire, v in _fields(buf):
        if number == 1:
            _want(wire, _LEN, "MetaGraphDef.meta_info_def")
            for n2, w2, v2 in _fields(v):
                if n2 == 4:
                    _want(w2, _LEN, "MetaInfoDef.tags")
                    tags.add(_string(v2, "MetaInfoDef.tags"))
        elif number == 5:
            _want(wire, _LEN, "MetaGraphDef.signature_def")
            if len(signatures) >= MAX_ENTRIES:
                raise SavedModelError("too many signatures")
            key, value = _map_entry(v, "MetaGraphDef.signature_def")
            signatures[key] = value
    return tags, signatures


def signature_names(data: bytes) -> list[str]:
    """The signature names of the `serve` graph."""
    return sorted(_serve_signatures(data))


def _serve_signatures(data: bytes) -> dict[str, memoryview]:
    if len(data) > MAX_BYTES:
        raise SavedModelError(f"saved_model.pb is larger than {MAX_BYTES} bytes")
    if not data:
        raise SavedModelError("saved_model.pb is empty")
    graphs: list[tuple[set[str], dict[str, memoryview]]] = []
    for number, wire, v in _fields(memoryview(data)):
        if number == 2:
            _want(wire, _LEN, "SavedModel.meta_graphs")
            graphs.append(_meta_graph(v))
    if not graphs:
        raise SavedModelError("saved_model.pb holds no meta graph")
    for tags, signatures in graphs:
        if SERVE_TAG in tags:
            return signatures
    raise SavedModelError(f"saved_model.pb has no meta graph tagged {SERVE_TAG!r}")


def read_signature(data: bytes, name: str = SERVING_DEFAULT) -> dict[str, Any]:
    """The signature `name` of the SavedModel's `serve` graph, as the registry records it:
    {"method_name": str, "inputs": {key: {"dtype": "DT_FLOAT", "shape": [-1, 20]}},
    "outputs": {...}}; a shape is None when its rank is unknown, -1 for an unknown dimension."""
    signatures = _serve_signatures(data)
    if name not in signatures:
        have = ", ".join(sorted(signatures)) or "none"
        raise SavedModelError(f"the SavedModel has no {name!r} signature (it has: {have})")
    return _signature(signatures[name])
