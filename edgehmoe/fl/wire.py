"""Wire messages exchanged between the aggregation server and device clients.

Every MQTT payload is ONE safetensors blob (https://github.com/huggingface/safetensors):

* the string metadata (``__metadata__``) carries ``type`` (message class name), ``protocol``
  (:data:`PROTOCOL_VERSION` as a decimal string) and ``fields`` (a JSON object with the scalar and
  dict fields of the message);
* arrays are tensors: model weights under ``w/<parameter name>``, other array fields under
  ``a/<field name>``.

:func:`decode` parses and checks the header itself *before* any array is materialised: total size,
header size, tensor count, dtypes, shapes, offsets, message type, protocol version, required
fields and their types, finite floats.  Only then does safetensors load the arrays.  Nothing is
ever unpickled.  See ``docs/protocol.md`` for topics, QoS and versioning.

:func:`decode` is fed bytes from the network (a device credential is enough to publish them), so
its contract is strict: for ANY byte string it returns a message or raises :class:`WireError`,
never another exception.  Every check is explicit (types are tested before values are hashed,
compared or converted); a last-resort guard turns anything unforeseen into a :class:`WireError`
as well and logs it as a decoder bug (``tests/test_wire_fuzz.py`` fails if the guard ever fires).

This module is part of the numpy core: it imports numpy, safetensors and the standard library
only (no torch, no paho).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Type, TypeVar, Union

import numpy as np

from edgehmoe.errors import EdgeHmoeError

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "MAX_NDIM",
    "MAX_ELEMENTS",
    "DEVICE_STATES",
    "STOPPED_DETAIL",
    "ID_PATTERN",
    "WireError",
    "Hello",
    "Status",
    "TrainTask",
    "TrainResult",
    "Message",
    "MESSAGE_TYPES",
    "check_id",
    "encode",
    "encode_many",
    "iter_encode",
    "decode",
]

#: Version of the wire protocol.  Bump it for ANY change of message fields or their meaning; peers
#: with another version are rejected, never guessed at.
PROTOCOL_VERSION = 1

#: Default upper bound of one payload (bytes).  Keep the broker's ``max_packet_size`` above it.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: Upper bound of the JSON header (bytes).
MAX_HEADER_BYTES = 1024 * 1024
#: Upper bound of the number of tensors in one payload.
MAX_TENSORS = 4096
#: Upper bound of the number of dimensions of one tensor.
MAX_NDIM = 8
#: Upper bound of the total number of array elements in one payload.
MAX_ELEMENTS = 64 * 1024 * 1024

#: Allowed values of :attr:`Status.state`.
DEVICE_STATES = ("online", "idle", "busy", "offline", "refused", "error")

#: :attr:`Status.detail` of the ``offline`` status a device publishes when it stops on purpose
#: (``edgehmoe-client`` stopped); its last will (connection lost) says something else.  The server
#: ends such a device's task at once instead of keeping it ``schedule.offline_grace_s`` for a
#: reconnect.  A server that does not know this value treats it as any ``offline``, so peers of
#: either kind still understand each other (no protocol version change).
STOPPED_DETAIL = "client stopped"

#: Run names, device ids and task ids: letters, digits, ``-``, ``_``, ``.`` (1-128 chars).  They
#: become MQTT topic levels and broker user names, so ``/``, ``+``, ``#`` and spaces are excluded.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# safetensors dtype tag <-> numpy dtype (little-endian, as safetensors stores them).
_DTYPES: Dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NUMPY_TO_TAG = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}

_WEIGHT_PREFIX = "w/"
_ARRAY_PREFIX = "a/"
_HEADER_LEN = struct.Struct("<Q")


class WireError(EdgeHmoeError, ValueError):
    """A payload (or a message to encode) is malformed, too large or of another protocol version.

    ``str(err)`` is the reason, meant for a log line.
    """


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
# eq=False: fields hold numpy arrays, whose element-wise == cannot define dataclass equality.


@dataclass(frozen=True, eq=False)
class Hello:
    """Device -> server on ``device/<id>/hello``: who I am and what I can do."""

    #: Device id; equals the broker user name and the ``<id>`` topic level.
    device_id: str
    #: edgehmoe version string of the device software, e.g. ``"0.1.0"``.
    software_version: str
    #: Wire protocol the device speaks; must equal the payload's ``protocol`` metadata.
    protocol_version: int
    #: Total RAM of the device in MiB.
    ram_mb: float
    #: Memory the device allows one training round to use, in MiB.
    memory_budget_mb: float
    #: Number of CPU cores.
    cores: int
    #: Free-form platform string, e.g. ``"Linux-6.6-aarch64 (Raspberry Pi 4 Model B)"``.
    platform: str
    #: int64 ``(num_classes,)``: number of samples per dataset class id in this device's shard.
    class_counts: np.ndarray


@dataclass(frozen=True, eq=False)
class Status:
    """Device -> server on ``device/<id>/status`` (retained; the last will says ``offline``)."""

    #: Device id.
    device_id: str
    #: One of :data:`DEVICE_STATES`: ``online|idle|busy|offline|refused|error``.
    state: str
    #: Round the state refers to, ``-1`` when none.
    round: int
    #: Human-readable detail (error text, why a task was refused, ...); may be empty.
    detail: str

    @property
    def stopped(self) -> bool:
        """``offline`` because the device stops on purpose (:data:`STOPPED_DETAIL`), not its last will."""
        return self.state == "offline" and self.detail == STOPPED_DETAIL


@dataclass(frozen=True, eq=False)
class TrainTask:
    """Server -> device on ``device/<id>/task``: train one expert (or the flat model) one round."""

    #: Run name (also a topic level).
    run: str
    #: Federated round number, >= 0.
    round: int
    #: Unique id of this task; the result echoes it.
    task_id: str
    #: Expert node index in the hierarchy's parent-index array; ``-1`` for the flat model.
    node: int
    #: JSON-able architecture spec, e.g.
    #: ``{"kind": "expert", "width": 8, "num_outputs": 5, "input_size": 32, "in_channels": 3}``.
    arch: Dict[str, Any]
    #: int64 ``(num_classes,)``: dataset class id -> output index of this expert, ``-1`` = sample
    #: not used for this task.
    label_map: np.ndarray
    #: Initial weights, parameter name -> array (state-dict order).
    weights: Dict[str, np.ndarray]
    #: Local epochs, >= 1.
    epochs: int
    #: Mini-batch size, >= 1.
    batch_size: int
    #: SGD learning rate, >= 0.
    lr: float
    #: SGD momentum, >= 0.
    momentum: float
    #: L2 weight decay, >= 0.
    weight_decay: float
    #: Results received after this UNIX time (seconds) are dropped by the server.
    deadline_unix: float
    #: Seed for the device's data order and augmentation.
    seed: int
    #: Input normalisation applied after scaling pixels to [0, 1]: ``{"mean": [...], "std": [...]}``
    #: with one float per input channel; ``{}`` = the device's default.
    preprocess: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Device -> server on ``device/<id>/result``: the locally trained weights and measurements."""

    #: Run name of the task.
    run: str
    #: Round of the task.
    round: int
    #: ``task_id`` of the task this result answers.
    task_id: str
    #: Device id of the sender.
    device_id: str
    #: Expert node index of the task (``-1`` = flat model).
    node: int
    #: Trained weights, same names, shapes and dtypes as the task's weights.
    weights: Dict[str, np.ndarray]
    #: Number of training samples used (the FedAvg weight), >= 0.
    num_examples: int
    #: Wall time of local training in ms (data loading + forward/backward/step, no network).
    round_time_ms: float
    #: Peak RSS during the round minus RSS just before it, MiB.
    round_mem_mb: float
    #: Peak absolute RSS during the round, MiB.
    peak_rss_mb: float
    #: Mean training loss of the last epoch.
    loss: float


Message = Union[Hello, Status, TrainTask, TrainResult]
M = TypeVar("M", Hello, Status, TrainTask, TrainResult)

#: Message class by its ``type`` metadata value.
MESSAGE_TYPES: Dict[str, type] = {cls.__name__: cls for cls in (Hello, Status, TrainTask, TrainResult)}

# Field kinds: "id" (str matching ID_PATTERN), "str", "int", "float" (finite), "dict" (JSON
# object), "int_vector" (1-D int64 array under a/<field>), "weights" (dict of arrays under w/).
_SCHEMA: Dict[str, Dict[str, str]] = {
    "Hello": {
        "device_id": "id",
        "software_version": "str",
        "protocol_version": "int",
        "ram_mb": "float",
        "memory_budget_mb": "float",
        "cores": "int",
        "platform": "str",
        "class_counts": "int_vector",
    },
    "Status": {"device_id": "id", "state": "str", "round": "int", "detail": "str"},
    "TrainTask": {
        "run": "id",
        "round": "int",
        "task_id": "id",
        "node": "int",
        "arch": "dict",
        "label_map": "int_vector",
        "weights": "weights",
        "epochs": "int",
        "batch_size": "int",
        "lr": "float",
        "momentum": "float",
        "weight_decay": "float",
        "deadline_unix": "float",
        "seed": "int",
        "preprocess": "dict",
    },
    "TrainResult": {
        "run": "id",
        "round": "int",
        "task_id": "id",
        "device_id": "id",
        "node": "int",
        "weights": "weights",
        "num_examples": "int",
        "round_time_ms": "float",
        "round_mem_mb": "float",
        "peak_rss_mb": "float",
        "loss": "float",
    },
}
_SCALAR_KINDS = ("id", "str", "int", "float", "dict")


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid run/device/task id, else raise :class:`WireError`."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise WireError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '-', '_' or '.' "
            "(no '/', '+', '#' or spaces)"
        )
    return value


# --------------------------------------------------------------------------------------------
# Field checks shared by encode and decode
# --------------------------------------------------------------------------------------------


def _check_scalar(type_name: str, name: str, kind: str, value: Any) -> Any:
    """Check one scalar/dict field; return the normalised value (ints accepted for floats)."""
    where = f"{type_name}.{name}"
    if kind == "id":
        return check_id(value, where)
    if kind == "str":
        if not isinstance(value, str):
            raise WireError(f"{where} must be a string, got {type(value).__name__}")
        return value
    if kind == "int":
        # bool is an int subclass, but True as a round number is a bug, not a value.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise WireError(f"{where} must be an integer, got {type(value).__name__}")
        return int(value)
    if kind == "float":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise WireError(f"{where} must be a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:  # an int with hundreds of digits
            raise WireError(f"{where} is too large for a float") from None
        if not math.isfinite(value):
            raise WireError(f"{where} must be finite, got {value}")
        return value
    if kind == "dict":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise WireError(f"{where} must be a JSON object with string keys")
        return value
    raise AssertionError(f"unknown field kind {kind}")  # pragma: no cover - schema bug


def _check_domain(type_name: str, v: Dict[str, Any]) -> None:
    """Value ranges that types alone do not express."""

    def need(cond: bool, text: str) -> None:
        if not cond:
            raise WireError(f"{type_name}: {text}")

    if type_name == "Hello":
        need(v["protocol_version"] == PROTOCOL_VERSION,
             f"protocol_version field {v['protocol_version']} != payload protocol {PROTOCOL_VERSION}")
        need(v["cores"] >= 1, f"cores must be >= 1, got {v['cores']}")
        need(v["ram_mb"] >= 0 and v["memory_budget_mb"] >= 0, "ram_mb and memory_budget_mb must be >= 0")
    elif type_name == "Status":
        need(v["state"] in DEVICE_STATES, f"state must be one of {'|'.join(DEVICE_STATES)}, got {v['state']!r}")
        need(v["round"] >= -1, f"round must be >= -1, got {v['round']}")
    elif type_name == "TrainTask":
        need(v["round"] >= 0, f"round must be >= 0, got {v['round']}")
        need(v["node"] >= -1, f"node must be >= -1, got {v['node']}")
        need(v["epochs"] >= 1, f"epochs must be >= 1, got {v['epochs']}")
        need(v["batch_size"] >= 1, f"batch_size must be >= 1, got {v['batch_size']}")
        for name in ("lr", "momentum", "weight_decay"):
            need(v[name] >= 0, f"{name} must be >= 0, got {v[name]}")
        pre = v["preprocess"]
        need(set(pre) <= {"mean", "std"}, f"preprocess keys must be mean/std, got {sorted(pre)}")
        for key, values in pre.items():
            need(isinstance(values, list) and len(values) >= 1
                 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values),
                 f"preprocess[{key!r}] must be a non-empty list of numbers")
        if "std" in pre:
            need(all(x > 0 for x in pre["std"]), "preprocess['std'] values must be > 0")
        if "mean" in pre and "std" in pre:
            need(len(pre["mean"]) == len(pre["std"]), "preprocess mean and std differ in length")
    elif type_name == "TrainResult":
        need(v["round"] >= 0, f"round must be >= 0, got {v['round']}")
        need(v["node"] >= -1, f"node must be >= -1, got {v['node']}")
        need(v["num_examples"] >= 0, f"num_examples must be >= 0, got {v['num_examples']}")


def _check_int_vector(type_name: str, name: str, arr: np.ndarray) -> None:
    where = f"{type_name}.{name}"
    if arr.ndim != 1:
        raise WireError(f"{where} must be 1-D, got shape {arr.shape}")
    if name == "class_counts" and arr.size and int(arr.min()) < 0:
        raise WireError(f"{where} must be >= 0")
    if name == "label_map" and arr.size and int(arr.min()) < -1:
        raise WireError(f"{where} values must be >= -1 (-1 = sample not used)")


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------


def _array_for_wire(where: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise WireError(f"{where} must be a numpy array, got {type(value).__name__}")
    tag = _NUMPY_TO_TAG.get(value.dtype.newbyteorder("=")) if value.dtype.kind != "O" else None
    if tag is None:
        raise WireError(
            f"{where} has unsupported dtype {value.dtype}; allowed: float32, float16, float64, "
            "int64, int32, uint8, bool"
        )
    if value.ndim > MAX_NDIM:
        raise WireError(f"{where} has {value.ndim} dimensions (max {MAX_NDIM})")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise WireError(f"{where} contains NaN or inf")
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    return np.asarray(value, dtype=_DTYPES[tag], order="C")


def _encode_parts(msg: Message, with_arrays: bool = True) -> tuple:
    """``(metadata, tensors)`` of ``msg``, checked as :func:`decode` would check them.

    ``with_arrays=False`` checks and returns the scalar fields only (``tensors`` is empty).
    """
    type_name = type(msg).__name__
    if MESSAGE_TYPES.get(type_name) is not type(msg):
        raise WireError(f"cannot encode {type_name}; known messages: {', '.join(MESSAGE_TYPES)}")
    schema = _SCHEMA[type_name]
    scalars: Dict[str, Any] = {}
    tensors: Dict[str, np.ndarray] = {}
    for name, kind in schema.items():
        value = getattr(msg, name)
        where = f"{type_name}.{name}"
        if kind in _SCALAR_KINDS:
            value = _check_scalar(type_name, name, kind, value)
            if kind == "dict":
                # Normalise as the receiver will see it (tuples -> lists); rejects NaN and
                # values JSON cannot carry (numpy scalars, sets, ...).
                try:
                    value = json.loads(json.dumps(value, allow_nan=False))
                except (TypeError, ValueError) as err:
                    raise WireError(f"{type_name}.{name} is not JSON-serialisable: {err}") from err
            scalars[name] = value
        elif not with_arrays:
            continue
        elif kind == "int_vector":
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
                raise WireError(f"{where} must be an integer numpy array")
            arr = value.astype(np.int64)
            _check_int_vector(type_name, name, arr)
            tensors[_ARRAY_PREFIX + name] = arr
        elif kind == "weights":
            if not isinstance(value, dict):
                raise WireError(f"{where} must be a dict of parameter name -> numpy array")
            for pname, arr in value.items():
                if not isinstance(pname, str) or not pname:
                    raise WireError(f"{where} has a parameter name that is not a non-empty string: {pname!r}")
                tensors[_WEIGHT_PREFIX + pname] = _array_for_wire(f"{where}[{pname!r}]", arr)
    _check_domain(type_name, scalars)
    if len(tensors) > MAX_TENSORS:
        raise WireError(f"{type_name} has {len(tensors)} arrays (max {MAX_TENSORS})")
    try:
        fields_json = json.dumps(scalars, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise WireError(f"{type_name} fields are not JSON-serialisable: {err}") from err
    return {"type": type_name, "protocol": str(PROTOCOL_VERSION), "fields": fields_json}, tensors


def encode(msg: Message) -> bytes:
    """Serialise one message to a single safetensors blob.

    Fields are validated as :func:`decode` would, so a malformed message fails at the sender
    with a :class:`WireError` instead of being rejected by the receiver.
    """
    from safetensors.numpy import save  # local: keeps "import edgehmoe.fl.wire" cheap

    metadata, tensors = _encode_parts(msg)
    return save(tensors, metadata=metadata)


def _array_values(msg: Message) -> tuple:
    return tuple(getattr(msg, name) for name, kind in _SCHEMA[type(msg).__name__].items()
                 if kind not in _SCALAR_KINDS)


def _array_fields(msg: Message) -> tuple:
    return tuple(id(v) for v in _array_values(msg))


def encode_many(msgs: "Sequence[Message]") -> "List[bytes]":
    """:func:`iter_encode`, as a list."""
    return list(iter_encode(msgs))


def iter_encode(msgs: "Iterable[Message]") -> "Iterator[bytes]":
    """:func:`encode` each message; messages whose array fields are the very same objects (``is``)
    as an earlier one's share its serialised tensors, and only their header is built again.

    A round sends one task per device, and in the paper's schedule every task of a round carries
    the same expert's weights and label map: encoding them once instead of a thousand times is
    what keeps publishing a round's tasks cheap. The bytes are a valid payload like any other
    (:func:`decode` returns the same message as for :func:`encode`); the arrays must not be
    changed while this runs. A generator: one payload at a time, so a thousand tasks need not
    be held in memory together.
    """
    import struct

    shared: Dict[tuple, tuple] = {}  # (type, ids of the array fields) -> (tensor entries, data bytes)
    for msg in msgs:
        key = (type(msg), _array_fields(msg)) if type(msg) in MESSAGE_TYPES.values() else None
        hit = shared.get(key) if key is not None else None
        if hit is None:
            blob = encode(msg)
            (n,) = _HEADER_LEN.unpack_from(blob, 0)
            entries = json.loads(blob[_HEADER_LEN.size:_HEADER_LEN.size + n])
            entries.pop("__metadata__", None)
            if key is not None:  # the arrays are kept referenced: their ids stay theirs
                shared[key] = (entries, blob[_HEADER_LEN.size + n:], _array_values(msg))
            yield blob
            continue
        metadata, _ = _encode_parts(msg, with_arrays=False)
        entries, data, _ = hit
        header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
        yield struct.pack("<Q", len(header)) + header + data


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list) -> dict:
    # Two values for one key would let a sender show one value to us and another to a different
    # JSON parser; refuse instead of picking one.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise WireError(f"non-finite number {name} in JSON")


def _loads(text: Union[str, bytes], what: str) -> Any:
    try:
        if isinstance(text, bytes):
            # Strict UTF-8, as safetensors reads it: json.loads(bytes) would also accept UTF-16/32.
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except WireError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise WireError(f"{what} is not valid JSON: {err}") from err


def _parse_header(payload: bytes, max_header_bytes: int) -> tuple:
    """Return (metadata, tensor entries, data start offset) after checking the header layout."""
    if len(payload) < _HEADER_LEN.size:
        raise WireError(f"truncated payload: {len(payload)} bytes, need at least {_HEADER_LEN.size}")
    (header_len,) = _HEADER_LEN.unpack_from(payload, 0)
    if header_len > max_header_bytes:
        raise WireError(f"header of {header_len} bytes exceeds the limit of {max_header_bytes}")
    data_start = _HEADER_LEN.size + header_len
    if data_start > len(payload):
        raise WireError(f"truncated payload: header says {header_len} bytes, only {len(payload) - 8} present")
    header = _loads(bytes(payload[_HEADER_LEN.size:data_start]), "header")
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("header has no string __metadata__ (not an edgehmoe message)")
    return metadata, header, data_start


def _check_tensor_entries(
    entries: Dict[str, Any], data_len: int, max_tensors: int, max_elements: int
) -> Dict[str, tuple]:
    """Check dtype/shape/offsets of every tensor; return name -> (dtype, shape, begin, end)."""
    if len(entries) > max_tensors:
        raise WireError(f"{len(entries)} tensors exceed the limit of {max_tensors}")
    checked: Dict[str, tuple] = {}
    total_elements = 0
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        tag = entry["dtype"]
        # isinstance first: a list or dict tag is unhashable, and `in` would raise TypeError.
        if not isinstance(tag, str) or tag not in _DTYPES:
            raise WireError(
                f"tensor {name!r}: dtype {tag!r} not allowed (allowed: {', '.join(_DTYPES)})"
            )
        shape = entry["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WireError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints")
        numel = 1
        for d in shape:
            numel *= d
            if numel > max_elements:
                break
        total_elements += numel
        if total_elements > max_elements:
            raise WireError(f"tensors hold more than {max_elements} elements in total")
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise WireError(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise WireError(f"tensor {name!r}: data_offsets {offsets} outside the {data_len}-byte buffer")
        if end - begin != numel * _DTYPES[tag].itemsize:
            raise WireError(f"tensor {name!r}: {end - begin} bytes do not match shape {shape} of {tag}")
        checked[name] = (_DTYPES[tag], tuple(shape), begin, end)
    # The buffer must be covered exactly once: no overlaps (aliasing), no gaps (hidden bytes).
    position = 0
    for name, (_, _, begin, end) in sorted(checked.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            raise WireError(f"tensor {name!r} starts at byte {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_len:
        raise WireError(f"{data_len - position} trailing bytes after the last tensor")
    return checked


def decode(
    payload: Union[bytes, bytearray, memoryview],
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    expect: Optional[Type[M]] = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    max_elements: int = MAX_ELEMENTS,
) -> Any:
    """Parse and validate one payload; return the message dataclass.

    :param payload: bytes received from MQTT.
    :param max_bytes: reject payloads larger than this.
    :param expect: if given, the message class the caller expects (e.g. :class:`TrainResult` on a
        result topic); any other type is rejected.
    :raises WireError: with the reason, for anything malformed, oversized, of an unexpected type
        or of another protocol version; never any other exception, whatever the bytes.
    """
    try:
        return _decode(payload, max_bytes, expect, max_header_bytes, max_tensors, max_elements)
    except WireError:
        raise
    except Exception as err:  # noqa: BLE001 - the contract: network bytes never raise anything else
        # Reaching this is a bug in the checks above (tests/test_wire_fuzz.py watches for this
        # log record); the payload is still refused, so one bad device cannot stop the server.
        logger.error("wire.decode bug: unexpected %s for a %s-byte payload; refused it",
                     type(err).__name__, len(payload) if hasattr(payload, "__len__") else "?", exc_info=True)
        raise WireError(f"malformed payload ({type(err).__name__}: {err})") from err


def _decode(
    payload: Union[bytes, bytearray, memoryview],
    max_bytes: int,
    expect: Optional[Type[M]],
    max_header_bytes: int,
    max_tensors: int,
    max_elements: int,
) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    metadata, entries, data_start = _parse_header(payload, max_header_bytes)

    # Type and version first: a peer of another version gets a clear reason, not a field error.
    type_name = metadata.get("type")
    if type_name not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {type_name!r}; known: {', '.join(MESSAGE_TYPES)}")
    version = metadata.get("protocol")
    if version != str(PROTOCOL_VERSION):
        raise WireError(
            f"protocol version mismatch: payload speaks {version!r}, this software speaks "
            f"{PROTOCOL_VERSION}; upgrade the older side"
        )
    cls = MESSAGE_TYPES[type_name]
    if expect is not None and cls is not expect:
        raise WireError(f"expected a {expect.__name__} message, got {type_name}")
    unknown_meta = set(metadata) - {"type", "protocol", "fields"}
    if unknown_meta:
        raise WireError(f"unknown metadata keys {sorted(unknown_meta)}")
    if "fields" not in metadata:
        raise WireError(f"{type_name}: metadata has no 'fields'")
    fields_in = _loads(metadata["fields"], f"{type_name} fields")
    if not isinstance(fields_in, dict):
        raise WireError(f"{type_name} fields are not a JSON object")

    schema = _SCHEMA[type_name]
    scalar_names = [n for n, k in schema.items() if k in _SCALAR_KINDS]
    missing = [n for n in scalar_names if n not in fields_in]
    if missing:
        raise WireError(f"{type_name}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(fields_in) - set(scalar_names))
    if extra:
        raise WireError(f"{type_name}: unknown field(s) {', '.join(extra)}")
    values: Dict[str, Any] = {n: _check_scalar(type_name, n, schema[n], fields_in[n]) for n in scalar_names}
    _check_domain(type_name, values)

    data_len = len(payload) - data_start
    checked = _check_tensor_entries(entries, data_len, max_tensors, max_elements)
    array_names = {n for n, k in schema.items() if k == "int_vector"}
    has_weights = "weights" in schema
    for name in checked:
        if name.startswith(_ARRAY_PREFIX) and name[len(_ARRAY_PREFIX):] in array_names:
            continue
        if has_weights and name.startswith(_WEIGHT_PREFIX) and len(name) > len(_WEIGHT_PREFIX):
            continue
        raise WireError(f"{type_name}: unexpected tensor {name!r}")
    for name in sorted(array_names):
        key = _ARRAY_PREFIX + name
        if key not in checked:
            raise WireError(f"{type_name}: missing array field {name}")
        if checked[key][0] != _DTYPES["I64"]:
            raise WireError(f"{type_name}.{name} must be int64, got {checked[key][0]}")

    # Finite check on a zero-copy view, before safetensors materialises anything.
    view = memoryview(payload)[data_start:]
    for name, (dtype, shape, begin, end) in checked.items():
        if dtype.kind == "f" and end > begin:
            arr = np.frombuffer(view[begin:end], dtype=dtype)
            if not np.isfinite(arr).all():
                raise WireError(f"{type_name}: tensor {name!r} contains NaN or inf")
        if name.startswith(_ARRAY_PREFIX):
            arr = np.frombuffer(view[begin:end], dtype=dtype).reshape(shape)
            _check_int_vector(type_name, name[len(_ARRAY_PREFIX):], arr)
    del view

    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(payload)
    except (SafetensorError, ValueError, TypeError) as err:
        raise WireError(f"safetensors could not load the payload: {err}") from err
    if set(arrays) != set(checked):  # pragma: no cover - would be a safetensors/parser mismatch
        raise WireError("safetensors saw other tensors than the header check")

    for name in array_names:
        values[name] = arrays[_ARRAY_PREFIX + name]
    if has_weights:
        values["weights"] = {
            key[len(_WEIGHT_PREFIX):]: arr for key, arr in arrays.items() if key.startswith(_WEIGHT_PREFIX)
        }
    try:
        return cls(**values)
    except TypeError as err:  # pragma: no cover - schema and dataclass out of sync
        raise WireError(f"{type_name}: {err}") from err


def _schema_matches_dataclasses() -> bool:
    """Self-check used by tests: the schema table lists exactly the dataclass fields, in order."""
    return all(
        [f.name for f in dataclasses.fields(MESSAGE_TYPES[t])] == list(_SCHEMA[t]) for t in MESSAGE_TYPES
    )
