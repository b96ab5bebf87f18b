"""Fuzz tests of edgehmoe.fl.wire.decode: for ANY byte string it returns a message or raises
WireError, nothing else (issue #10: a list-valued dtype raised TypeError and crashed the server).

Two parts, both bounded so the file runs in a few seconds:

* hypothesis properties over raw bytes and over structured headers whose entries, metadata and
  fields are replaced by arbitrary JSON values (lists, dicts, null, huge and negative ints, ...);
* a seeded mutation loop over a valid message of every type: byte flips, truncations, length
  prefixes, JSON-tree replacements anywhere in the header or the fields, and hand-made nasty
  header texts (deep nesting, duplicate keys, non-UTF-8, huge ints, NaN/1e999).

Every accepted payload must re-encode (what decode accepts, encode accepts), and decode's
last-resort guard (which turns an unforeseen exception into WireError and logs it as a decoder
bug) must never fire: each rejection has to come from an explicit check.
"""

from __future__ import annotations

import json
import logging
import random
import struct
from typing import Any, Callable, List

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason='pip install "hypothesis>=6" (the dev extra)')
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgehmoe.fl import wire  # noqa: E402
from edgehmoe.fl.wire import MESSAGE_TYPES, Status, WireError, decode, encode  # noqa: E402
from test_wire import make_hello, make_result, make_task  # noqa: E402

SEED_MESSAGES = {
    "Hello": encode(make_hello()),
    "Status": encode(Status(device_id="dev-a", state="busy", round=4, detail="training node 3")),
    "TrainTask": encode(make_task()),
    "TrainResult": encode(make_result()),
}

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _GuardWatcher(logging.Handler):
    """Collects the decoder-bug records of decode's last-resort guard."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_guard_records():
    watcher = _GuardWatcher()
    log = logging.getLogger(wire.__name__)
    log.addHandler(watcher)
    try:
        yield watcher
    finally:
        log.removeHandler(watcher)
    assert not watcher.records, [r.getMessage() for r in watcher.records]


def check_decode(payload: bytes, **kwargs: Any) -> None:
    """decode either returns a message that encodes again, or raises WireError; nothing else."""
    try:
        msg = decode(payload, **kwargs)
    except WireError as err:
        assert str(err)  # a reason for the log line
        return
    assert type(msg) in MESSAGE_TYPES.values()
    assert isinstance(encode(msg), bytes)


def split(payload: bytes):
    (n,) = struct.unpack_from("<Q", payload, 0)
    return json.loads(payload[8:8 + n]), payload[8 + n:]


def join(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


def join_json(header: Any, data: bytes) -> bytes:
    return join(json.dumps(header).encode(), data)


# --------------------------------------------------------------------------------------------
# hypothesis
# --------------------------------------------------------------------------------------------

_ints = st.one_of(
    st.integers(min_value=-3, max_value=70),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([2**63 - 1, 2**64, -2**63, 10**400, -(10**400)]),
)
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=12), st.sampled_from(list(wire._DTYPES) + ["F32 ", "f32", "O", "F8_E4M3"]))
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
seed_names = st.sampled_from(sorted(SEED_MESSAGES))
with_tensors = st.sampled_from(["Hello", "TrainResult", "TrainTask"])  # Status has no arrays


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes(payload: bytes) -> None:
    check_decode(payload)


@FUZZ
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=2**64 - 1))
def test_any_bytes_after_any_length_prefix(body: bytes, length: int) -> None:
    check_decode(struct.pack("<Q", length) + body)


@FUZZ
@given(json_values, st.binary(max_size=64))
def test_any_json_header(header: Any, data: bytes) -> None:
    check_decode(join_json(header, data))


@FUZZ
@given(with_tensors, st.data())
def test_tensor_entry_confusion(name: str, data: st.DataObject) -> None:
    header, body = split(SEED_MESSAGES[name])
    tensor = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
    header[tensor][key] = data.draw(json_values)
    check_decode(join_json(header, body))


@FUZZ
@given(seed_names, st.data())
def test_entry_and_metadata_replaced_whole(name: str, data: st.DataObject) -> None:
    header, body = split(SEED_MESSAGES[name])
    key = data.draw(st.sampled_from(sorted(header)))
    header[key] = data.draw(json_values)
    check_decode(join_json(header, body))


@FUZZ
@given(seed_names, st.data())
def test_metadata_value_confusion(name: str, data: st.DataObject) -> None:
    header, body = split(SEED_MESSAGES[name])
    key = data.draw(st.sampled_from(["type", "protocol", "fields", "other"]))
    value = data.draw(json_values)
    # JSON text (the way a string value must look) or a raw JSON value of any type
    header["__metadata__"][key] = json.dumps(value) if data.draw(st.booleans()) else value
    check_decode(join_json(header, body))


@FUZZ
@given(seed_names, st.data())
def test_field_value_confusion(name: str, data: st.DataObject) -> None:
    header, body = split(SEED_MESSAGES[name])
    fields = json.loads(header["__metadata__"]["fields"])
    key = data.draw(st.sampled_from(sorted(fields) + ["unknown"]))
    if data.draw(st.integers(0, 5)) == 0:
        fields.pop(key, None)
    else:
        fields[key] = data.draw(json_values)
    header["__metadata__"]["fields"] = json.dumps(fields)
    check_decode(join_json(header, body))


@FUZZ
@given(seed_names, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
       st.integers(min_value=0))
def test_byte_mutations(name: str, flips, cut: int) -> None:
    payload = bytearray(SEED_MESSAGES[name])
    for pos, value in flips:
        payload[pos % len(payload)] = value
    check_decode(bytes(payload[: len(payload) - cut % 64]))


# --------------------------------------------------------------------------------------------
# Bounded mutation loop (seeded, no hypothesis): a few thousand cases per run
# --------------------------------------------------------------------------------------------

NASTY_VALUES: List[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**300, -(10**300), 1e308, -0.0, 0.5,
    "", "F32", "I64", "BOOL", "X", "\u0000", "é", [], [None], ["F32"], [0, 0], [0, -1], [-8, 0],
    [2**64, 2**64], [1.5, 2.5], [[0, 4]], {}, {"F32": 1}, {"dtype": "F32"}, [[[[]]]],
]


def _paths(node: Any, prefix=()):
    """Every (container, key) position in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield node, k
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield node, i
            yield from _paths(v, prefix + (i,))


def _mutate_tree(rng: random.Random, tree: Any) -> Any:
    positions = list(_paths(tree))
    if not positions:
        return rng.choice(NASTY_VALUES)
    container, key = rng.choice(positions)
    action = rng.random()
    if action < 0.7:
        container[key] = rng.choice(NASTY_VALUES)
    elif action < 0.85 and isinstance(container, dict):
        del container[key]
    elif isinstance(container, dict):
        container[rng.choice(["extra", "__metadata__", "w/", "a/label_map", "w/x"])] = rng.choice(NASTY_VALUES)
    else:
        container.append(rng.choice(NASTY_VALUES))
    return tree


def _header_mutation(rng: random.Random, payload: bytes) -> bytes:
    header, body = split(payload)
    if rng.random() < 0.5:  # somewhere inside the fields JSON (a string inside the metadata)
        fields = json.loads(header["__metadata__"]["fields"])
        header["__metadata__"]["fields"] = json.dumps(_mutate_tree(rng, fields))
    else:
        header = _mutate_tree(rng, header)
    return join_json(header, body)


def _byte_mutation(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    action = rng.randrange(5)
    if action == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif action == 1:
        del data[rng.randrange(len(data)):]
    elif action == 2:
        data[0:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(data), len(data) - 8, 2**63, 2**64 - 1,
                                                  rng.randrange(len(data))]))
    elif action == 3:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        at = rng.randrange(8, len(data))
        data += data[at:at + rng.randint(1, 64)]  # trailing garbage
    return bytes(data)


def _text_mutation(rng: random.Random, payload: bytes) -> bytes:
    """Header texts json.dumps would never write."""
    header, body = split(payload)
    text = json.dumps(header)
    deep = rng.choice([50, 5_000, 200_000])
    choices: List[Callable[[], bytes]] = [
        lambda: ("[" * deep + "]" * deep).encode(),
        lambda: ('{"a":' * deep + "1" + "}" * deep).encode(),
        lambda: text.replace('"dtype": "', '"dtype": "F32", "dtype": "', 1).encode(),
        lambda: text[:-1].encode() + b', "__metadata__": {"type": "Status"}}',
        lambda: text.replace('"shape": [', '"shape": [' + "9" * rng.choice([30, 5000]) + ", ", 1).encode(),
        lambda: text.replace('"data_offsets": [', '"data_offsets": [1e999, ', 1).encode(),
        lambda: text.replace('"data_offsets": [', '"data_offsets": [NaN, ', 1).encode(),
        lambda: text.encode("utf-16"),
        lambda: text.encode()[:-1] + b"\xff\xfe}",
        lambda: b"\xef\xbb\xbf" + text.encode(),  # UTF-8 byte order mark
        lambda: text.encode() + b" " * rng.randrange(4),
        lambda: text.replace("Hello", "hello").replace("Status", "Status\u0000").encode(),
    ]
    return join(rng.choice(choices)(), body)


@pytest.mark.parametrize("name", sorted(SEED_MESSAGES))
def test_mutation_loop(name: str) -> None:
    # Prepare
    rng = random.Random(f"wire-fuzz-{name}")
    seed = SEED_MESSAGES[name]
    mutators = [_header_mutation, _header_mutation, _byte_mutation, _text_mutation]
    outcomes = {"accepted": 0, "rejected": 0}
    # Execute
    for i in range(1200):
        payload = rng.choice(mutators)(rng, seed)
        if i % 3 == 0:  # stack a second mutation
            try:
                payload = rng.choice(mutators[:3])(rng, payload)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, struct.error):
                pass  # the first mutation made a header the harness itself cannot parse; keep it
        try:
            decode(payload, expect=MESSAGE_TYPES[name] if i % 2 else None)
            outcomes["accepted"] += 1
        except WireError:
            outcomes["rejected"] += 1
    # Assert: every case ended in one of the two allowed ways, and most mutations are caught
    assert sum(outcomes.values()) == 1200
    assert outcomes["rejected"] > 900, outcomes


def test_seed_messages_decode() -> None:
    # The fuzzers start from valid payloads: otherwise they would only exercise the first check.
    for name, payload in SEED_MESSAGES.items():
        assert type(decode(payload)).__name__ == name
