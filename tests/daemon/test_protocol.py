"""The control protocol's framing and typing, without a daemon."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import protocol


def test_request_round_trip() -> None:
    req = protocol.Request(3, "create", {"name": "try1", "workspace": "proj"})
    assert protocol.decode_request(req.encode()) == req


def test_error_response_round_trip_and_exit_code() -> None:
    resp = protocol.Response(4, error=protocol.Error("not-found", "no branch 'x'"))
    back = protocol.decode_response(resp.encode())
    assert back == resp and not back.ok
    assert back.error is not None and back.error.exit_code == protocol.ExitCode.NOT_FOUND


@pytest.mark.parametrize("line, why", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"op": "status"}', "integer 'id'"),
    (b'{"id": true, "op": "status"}', "integer 'id'"),
    (b'{"id": 1, "op": "format-disk"}', "unknown op"),
    (b'{"id": 1, "op": "create", "args": {}}', "missing name"),
    (b'{"id": 1, "op": "create", "args": []}', "not an object"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_requests_are_protocol_errors(line: bytes, why: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.decode_request(line)


def test_oversized_message_is_refused_both_ways() -> None:
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode_request(b"x" * (protocol.MAX_MESSAGE + 1))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.Request(1, "create", {"name": "x" * protocol.MAX_MESSAGE}).encode()


def test_every_error_code_has_a_documented_exit_code() -> None:
    codes = {v for k, v in vars(protocol.ExitCode).items() if k.isupper()}
    assert set(protocol.ERROR_EXIT.values()) <= codes


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


# no deadline: a loaded CI machine must not turn a slow example into a failure
@settings(deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        protocol.decode_request(data)
    except protocol.ProtocolError:
        pass


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "op", "args", "extra"]), json_values))
def test_arbitrary_objects_never_crash_the_parser(obj: dict) -> None:
    try:
        req = protocol.decode_request(json.dumps(obj).encode())
    except protocol.ProtocolError:
        return
    assert req.op in protocol.OPS and isinstance(req.args, dict)
