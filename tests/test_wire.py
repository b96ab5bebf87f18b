"""Tests of edgehmoe.fl.wire: round trips and every rejection path of decode()."""

from __future__ import annotations

import json
import logging
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from edgehmoe.fl import wire
from edgehmoe.fl.wire import (
    PROTOCOL_VERSION,
    Hello,
    Status,
    TrainResult,
    TrainTask,
    WireError,
    decode,
    encode,
)


def make_hello() -> Hello:
    return Hello(
        device_id="dev-a",
        software_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        ram_mb=3791.5,
        memory_budget_mb=512.0,
        cores=4,
        platform="Linux-6.6-aarch64 (Raspberry Pi 4 Model B)",
        class_counts=np.array([3, 0, 7], dtype=np.int64),
    )


def make_weights() -> dict:
    return {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
        "bn.running_var": np.ones(2, dtype=np.float32),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "head.bias": np.array([0.5, -1.25], dtype=np.float16),
        "mask": np.array([True, False]),
    }


def make_task(**overrides) -> TrainTask:
    values = dict(
        run="cifar-run.1",
        round=4,
        task_id="r4-n3-dev-a",
        node=3,
        arch={"kind": "expert", "width": 8, "num_outputs": 5, "input_size": 32, "in_channels": 3},
        label_map=np.array([0, -1, 1, -1, 4], dtype=np.int64),
        weights=make_weights(),
        epochs=2,
        batch_size=32,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        deadline_unix=1_790_000_000.5,
        seed=7,
        preprocess={"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]},
    )
    values.update(overrides)
    return TrainTask(**values)


def make_result(**overrides) -> TrainResult:
    values = dict(
        run="cifar-run.1",
        round=4,
        task_id="r4-n3-dev-a",
        device_id="dev-a",
        node=3,
        weights=make_weights(),
        num_examples=250,
        round_time_ms=1834.25,
        round_mem_mb=41.5,
        peak_rss_mb=388.0,
        loss=0.731,
    )
    values.update(overrides)
    return TrainResult(**values)


def assert_same(a, b) -> None:
    """Field-by-field equality (the dataclasses hold arrays, so they define no ==)."""
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, dict) and name == "weights":
            assert sorted(x) == sorted(y)
            for key in x:
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
                np.testing.assert_array_equal(x[key], y[key])
        else:
            assert x == y, name


def header_of(payload: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", payload, 0)
    return json.loads(payload[8:8 + n])


def with_header(payload: bytes, header: dict) -> bytes:
    """Replace the JSON header of a payload, keeping its data buffer."""
    (n,) = struct.unpack_from("<Q", payload, 0)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload[8 + n:]


def with_fields(payload: bytes, **changes) -> bytes:
    header = header_of(payload)
    fields = json.loads(header["__metadata__"]["fields"])
    fields.update(changes)
    header["__metadata__"]["fields"] = json.dumps(fields)
    return with_header(payload, header)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        make_hello(),
        Status(device_id="dev-a", state="busy", round=4, detail="training node 3"),
        Status(device_id="dev-b", state="offline", round=-1, detail=""),
        make_task(),
        make_task(node=-1, arch={"kind": "flat", "width": 32, "num_outputs": 100}),
        make_result(),
    ],
    ids=["hello", "status", "status-offline", "task", "task-flat", "result"],
)
def test_round_trip(msg) -> None:
    # Execute
    payload = encode(msg)
    decoded = decode(payload, expect=type(msg))

    # Assert
    assert isinstance(payload, bytes)
    assert_same(msg, decoded)


def test_round_trip_empty_weights() -> None:
    msg = make_result(weights={})
    decoded = decode(encode(msg))
    assert decoded.weights == {}
    assert decoded.num_examples == 250


def test_round_trip_zero_size_and_0d_arrays() -> None:
    msg = make_task(weights={"empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5)},
                    label_map=np.zeros(0, np.int64))
    decoded = decode(encode(msg))
    assert decoded.weights["empty"].shape == (0, 3)
    assert decoded.weights["scalar"].shape == () and decoded.weights["scalar"] == 2.5
    assert decoded.label_map.shape == (0,)


def test_encode_normalises_byte_order_and_int_width() -> None:
    msg = make_task(weights={"w": np.arange(3, dtype=">f4")}, label_map=np.array([0, 1], dtype=np.int32))
    decoded = decode(encode(msg))
    assert decoded.weights["w"].dtype == np.float32
    np.testing.assert_array_equal(decoded.weights["w"], [0, 1, 2])
    assert decoded.label_map.dtype == np.int64


def test_payload_layout_is_plain_safetensors() -> None:
    payload = encode(make_task())
    header = header_of(payload)
    meta = header.pop("__metadata__")
    assert meta["type"] == "TrainTask" and meta["protocol"] == str(PROTOCOL_VERSION)
    assert json.loads(meta["fields"])["node"] == 3
    assert set(header) == {"a/label_map"} | {f"w/{k}" for k in make_weights()}


def test_payload_contains_no_pickle() -> None:
    payload = encode(make_task())
    # A pickle stream starts with PROTO (0x80) + protocol number and ends with STOP ('.').
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert bytes([0x80, proto]) not in payload[:8 + header_of_len(payload)]
    assert b"numpy.core.multiarray" not in payload and b"_reconstruct" not in payload
    with pytest.raises(Exception):
        pickle.loads(payload)


def header_of_len(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload, 0)[0]


def test_schema_lists_every_dataclass_field() -> None:
    assert wire._schema_matches_dataclasses()


# --------------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1])
def test_rejects_truncated_payload(cut: int) -> None:
    payload = encode(make_task())
    with pytest.raises(WireError):
        decode(payload[:cut])


def test_rejects_garbage() -> None:
    with pytest.raises(WireError, match="header"):
        decode(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WireError):
        decode(bytes(range(256)) * 4)
    with pytest.raises(WireError, match="bytes"):
        decode("a string")  # type: ignore[arg-type]


def test_rejects_header_too_long() -> None:
    # Prepare: a header length far above the limit, with nothing behind it
    payload = struct.pack("<Q", 2 * wire.MAX_HEADER_BYTES) + b"{}"

    # Execute / Assert
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(payload)


def test_rejects_payload_above_max_bytes() -> None:
    payload = encode(make_task())
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(payload, max_bytes=len(payload) - 1)
    assert decode(payload, max_bytes=len(payload)).round == 4


def test_rejects_wrong_type() -> None:
    payload = encode(make_result())
    with pytest.raises(WireError, match="expected a TrainTask message, got TrainResult"):
        decode(payload, expect=TrainTask)


def test_rejects_unknown_type() -> None:
    header = header_of(encode(make_result()))
    header["__metadata__"]["type"] = "Shutdown"
    with pytest.raises(WireError, match="unknown message type"):
        decode(with_header(encode(make_result()), header))


def test_rejects_other_protocol_version() -> None:
    payload = encode(make_task())
    header = header_of(payload)
    header["__metadata__"]["protocol"] = str(PROTOCOL_VERSION + 1)
    with pytest.raises(WireError) as info:
        decode(with_header(payload, header))
    assert "protocol version mismatch" in str(info.value)
    assert repr(str(PROTOCOL_VERSION + 1)) in str(info.value) and str(PROTOCOL_VERSION) in str(info.value)


def test_rejects_hello_with_inconsistent_protocol_field() -> None:
    payload = with_fields(encode(make_hello()), protocol_version=PROTOCOL_VERSION + 1)
    with pytest.raises(WireError, match="protocol_version"):
        decode(payload)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_weights(bad: float) -> None:
    weights = make_weights()
    weights["conv.weight"][0, 0, 0, 0] = bad
    # The sender refuses to encode them ...
    with pytest.raises(WireError, match="NaN or inf"):
        encode(make_result(weights=weights))
    # ... and the receiver refuses a payload built by someone else.
    meta = header_of(encode(make_result()))["__metadata__"]
    forged = save({"w/conv.weight": weights["conv.weight"]}, metadata=meta)
    with pytest.raises(WireError, match="NaN or inf"):
        decode(forged)


def test_rejects_non_finite_scalar() -> None:
    with pytest.raises(WireError, match="finite"):
        encode(make_result(loss=float("nan")))
    payload = encode(make_result())
    text = header_of(payload)
    text["__metadata__"]["fields"] = text["__metadata__"]["fields"].replace('"loss":0.731', '"loss":NaN')
    with pytest.raises(WireError, match="non-finite"):
        decode(with_header(payload, text))


def test_rejects_object_and_unsupported_dtypes() -> None:
    with pytest.raises(WireError, match="unsupported dtype object"):
        encode(make_result(weights={"w": np.array([1, "a"], dtype=object)}))
    with pytest.raises(WireError, match="unsupported dtype complex64"):
        encode(make_result(weights={"w": np.zeros(2, np.complex64)}))
    # A payload with a dtype safetensors knows but we do not accept (uint16).
    meta = header_of(encode(make_result()))["__metadata__"]
    forged = save({"w/w": np.zeros(2, np.uint16)}, metadata=meta)
    with pytest.raises(WireError, match="dtype 'U16' not allowed"):
        decode(forged)
    # A header that claims an "object" dtype.
    payload = encode(make_result(weights={"w": np.zeros(2, np.float32)}))
    header = header_of(payload)
    header["w/w"]["dtype"] = "O"
    with pytest.raises(WireError, match="not allowed"):
        decode(with_header(payload, header))


def test_rejects_missing_field() -> None:
    payload = encode(make_task())
    header = header_of(payload)
    fields = json.loads(header["__metadata__"]["fields"])
    del fields["lr"]
    header["__metadata__"]["fields"] = json.dumps(fields)
    with pytest.raises(WireError, match="missing field.*lr"):
        decode(with_header(payload, header))


def test_rejects_missing_array_field() -> None:
    meta = header_of(encode(make_task()))["__metadata__"]
    forged = save({"w/x": np.zeros(2, np.float32)}, metadata=meta)
    with pytest.raises(WireError, match="missing array field label_map"):
        decode(forged)


def test_rejects_wrong_field_types() -> None:
    payload = encode(make_task())
    with pytest.raises(WireError, match="round must be an integer"):
        decode(with_fields(payload, round="4"))
    with pytest.raises(WireError, match="round must be an integer"):
        decode(with_fields(payload, round=True))
    with pytest.raises(WireError, match="lr must be a number"):
        decode(with_fields(payload, lr="fast"))
    with pytest.raises(WireError, match="arch must be a JSON object"):
        decode(with_fields(payload, arch=[1, 2]))
    with pytest.raises(WireError, match="invalid TrainTask.run"):
        decode(with_fields(payload, run="a/b/#"))
    with pytest.raises(WireError, match="unknown field"):
        decode(with_fields(payload, extra=1))


def test_rejects_bad_values() -> None:
    with pytest.raises(WireError, match="state must be one of"):
        encode(Status(device_id="dev-a", state="sleeping", round=0, detail=""))
    with pytest.raises(WireError, match="epochs must be >= 1"):
        decode(with_fields(encode(make_task()), epochs=0))
    with pytest.raises(WireError, match="label_map values must be >= -1"):
        encode(make_task(label_map=np.array([0, -2], dtype=np.int64)))
    with pytest.raises(WireError, match="invalid Hello.device_id"):
        encode(Hello(**{**make_hello().__dict__, "device_id": "dev a"}))


def test_rejects_bad_tensor_layout() -> None:
    payload = encode(make_result(weights={"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}))
    header = header_of(payload)

    overlapping = json.loads(json.dumps(header))
    overlapping["w/b"]["data_offsets"] = overlapping["w/a"]["data_offsets"]
    with pytest.raises(WireError, match="gap or overlap|trailing"):
        decode(with_header(payload, overlapping))

    wrong_shape = json.loads(json.dumps(header))
    wrong_shape["w/a"]["shape"] = [5]
    with pytest.raises(WireError, match="do not match shape"):
        decode(with_header(payload, wrong_shape))

    outside = json.loads(json.dumps(header))
    outside["w/a"]["data_offsets"] = [0, 10_000]
    with pytest.raises(WireError, match="outside"):
        decode(with_header(payload, outside))

    unexpected = json.loads(json.dumps(header))
    unexpected["x/evil"] = unexpected.pop("w/a")
    with pytest.raises(WireError, match="unexpected tensor"):
        decode(with_header(payload, unexpected))


def test_rejects_tensor_count_and_element_limits() -> None:
    payload = encode(make_result(weights={f"p{i}": np.zeros(3, np.float32) for i in range(5)}))
    with pytest.raises(WireError, match="5 tensors exceed the limit of 4"):
        decode(payload, max_tensors=4)
    with pytest.raises(WireError, match="more than 14 elements"):
        decode(payload, max_elements=14)
    assert len(decode(payload, max_tensors=5, max_elements=15).weights) == 5

    header = header_of(payload)
    header["w/p0"]["shape"] = [2**40, 2**40]
    with pytest.raises(WireError, match="elements"):
        decode(with_header(payload, header))


def test_rejects_duplicate_json_keys() -> None:
    payload = encode(make_status := Status(device_id="dev-a", state="idle", round=1, detail=""))
    (n,) = struct.unpack_from("<Q", payload, 0)
    text = payload[8:8 + n].decode().rstrip()
    doubled = text[:-1] + ',"__metadata__":{"type":"Status"}}'
    forged = struct.pack("<Q", len(doubled)) + doubled.encode() + payload[8 + n:]
    with pytest.raises(WireError, match="duplicate JSON key"):
        decode(forged)
    assert decode(payload).state == make_status.state


def test_rejects_non_edgehmoe_safetensors() -> None:
    with pytest.raises(WireError, match="__metadata__"):
        decode(save({"x": np.zeros(2, np.float32)}))


def test_task_preprocess_defaults_and_checks() -> None:
    values = {k: getattr(make_task(), k) for k in make_task().__dataclass_fields__ if k != "preprocess"}
    assert decode(encode(TrainTask(**values))).preprocess == {}
    assert decode(encode(make_task(preprocess={"mean": (0.5,), "std": (0.25,)}))).preprocess == {
        "mean": [0.5], "std": [0.25]}
    with pytest.raises(WireError, match="preprocess keys"):
        encode(make_task(preprocess={"scale": [1.0]}))
    with pytest.raises(WireError, match="std'\\] values must be > 0"):
        encode(make_task(preprocess={"mean": [0.5], "std": [0.0]}))
    with pytest.raises(WireError, match="differ in length"):
        encode(make_task(preprocess={"mean": [0.5, 0.5], "std": [0.2]}))
    with pytest.raises(WireError, match="not JSON-serialisable"):
        encode(make_task(preprocess={"mean": [np.float32(0.5)]}))


# --------------------------------------------------------------------------------------------
# Issue #10: decode raises WireError and nothing else, whatever a device sends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_dtype", [["F32"], {"F32": 1}, None, 4, True])
@pytest.mark.parametrize("make", [make_hello, make_result], ids=["hello", "result"])
def test_issue10_row1_non_string_dtype_is_a_wire_error(make, bad_dtype) -> None:
    # Row 1: '"dtype": ["F32"]' (or a dict) on a hello/result topic raised TypeError
    # (unhashable type) out of decode, which the server did not catch and exited.
    msg = make()
    payload = encode(msg)
    header = header_of(payload)
    name = "a/class_counts" if isinstance(msg, Hello) else "w/conv.weight"
    header[name]["dtype"] = bad_dtype
    with pytest.raises(WireError, match=f"tensor '{name}': dtype .* not allowed"):
        decode(with_header(payload, header), expect=type(msg))


def test_issue10_huge_int_in_a_float_field_is_a_wire_error() -> None:
    # float(10**400) raises OverflowError; JSON allows such ints.
    payload = with_fields(encode(make_result()), loss=10**400)
    with pytest.raises(WireError, match="TrainResult.loss is too large for a float"):
        decode(payload)


def test_issue10_header_must_be_utf8() -> None:
    payload = encode(Status(device_id="dev-a", state="idle", round=1, detail=""))
    header_text = json.dumps(header_of(payload))
    for raw in (header_text.encode("utf-16"), header_text.encode()[:-1] + b"\xff}",
                b"\xef\xbb\xbf" + header_text.encode()):
        forged = struct.pack("<Q", len(raw)) + raw
        with pytest.raises(WireError, match="header is not valid JSON"):
            decode(forged)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000])
def test_issue10_deeply_nested_header_is_a_wire_error(text: str) -> None:
    raw = text.encode()
    with pytest.raises(WireError, match="not valid JSON|not a JSON object|__metadata__"):
        decode(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("offsets", [[-4, 0], [0, -1], [2**64, 2**64 + 16], [0, 10**300], [0.0, 16], ["0", "16"],
                                     None, [0], [0, 16, 32]])
def test_issue10_bad_data_offsets_are_wire_errors(offsets) -> None:
    payload = encode(make_result(weights={"a": np.zeros(4, np.float32)}))
    header = header_of(payload)
    header["w/a"]["data_offsets"] = offsets
    with pytest.raises(WireError, match="data_offsets"):
        decode(with_header(payload, header))


def test_issue10_decode_guard_turns_a_decoder_bug_into_a_wire_error(monkeypatch, caplog) -> None:
    # Defence in depth: were a check ever to raise something else, the payload is still refused
    # with a WireError (the server keeps running) and the bug is logged at ERROR.
    def broken(*args, **kwargs):
        raise KeyError("simulated decoder bug")

    monkeypatch.setattr(wire, "_check_tensor_entries", broken)
    with caplog.at_level(logging.ERROR, logger=wire.__name__):
        with pytest.raises(WireError, match="malformed payload \\(KeyError"):
            decode(encode(make_result()))
    assert [r.levelno for r in caplog.records if "wire.decode bug" in r.getMessage()] == [logging.ERROR]
