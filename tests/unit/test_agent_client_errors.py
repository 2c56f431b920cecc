"""grpc status → AgentError mapping, message sanitising, and the untrusted-output checks."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_client import validate
from agent_client.errors import (
    AgentAlreadyExists,
    AgentBadResponse,
    AgentError,
    AgentFailedPrecondition,
    AgentInternal,
    AgentInvalidArgument,
    AgentNotFound,
    AgentTimeout,
    AgentUnavailable,
    AgentUnimplemented,
)
from agent_client.grpc_client import error_from_status, sanitize_message


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, AgentNotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AgentAlreadyExists),
        (grpc.StatusCode.INVALID_ARGUMENT, AgentInvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, AgentFailedPrecondition),
        (grpc.StatusCode.UNIMPLEMENTED, AgentUnimplemented),
        (grpc.StatusCode.UNAVAILABLE, AgentUnavailable),
        (grpc.StatusCode.CANCELLED, AgentUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, AgentTimeout),
        (grpc.StatusCode.INTERNAL, AgentInternal),
        (grpc.StatusCode.UNKNOWN, AgentInternal),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, AgentInternal),
        (None, AgentInternal),
    ],
)
def test_status_maps_to_one_class(code: grpc.StatusCode | None, cls: type[AgentError]) -> None:
    err = error_from_status("StartContainer", code, "container c1: not running")
    assert type(err) is cls
    assert err.message == "container c1: not running"
    assert err.method == "StartContainer"
    assert str(err) == "agent StartContainer: container c1: not running"


def test_empty_details_fall_back_to_the_code_name() -> None:
    assert error_from_status("Check", grpc.StatusCode.UNAVAILABLE, "").message == "unavailable"


def test_agent_message_is_bounded_and_printable() -> None:
    assert sanitize_message("bad\x1b[2Jthing\n") == "bad?[2Jthing?"
    long = sanitize_message("x" * 10_000)
    assert len(long) < 1100 and long.endswith("...")


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_exit_status_is_always_a_byte(status: int) -> None:
    got = validate.exit_status(status, "c1/")
    assert 0 <= got <= 255
    assert got == (status if 0 <= status <= 255 else 255)


@pytest.mark.parametrize("bad", [0, -1, validate.PID_MAX_LIMIT + 1])
def test_impossible_pids_are_errors(bad: int) -> None:
    with pytest.raises(AgentBadResponse, match="impossible pid"):
        validate.pid(bad, "container c1")
    with pytest.raises(AgentBadResponse):
        validate.pids([5, bad], "container c1")
    assert validate.pid(1, "c") == 1


def test_bounds_on_lengths_sizes_and_ids() -> None:
    assert issubclass(AgentBadResponse, AgentInternal)
    with pytest.raises(AgentBadResponse):
        validate.accepted_len(5, 4, "stdin")
    assert validate.accepted_len(4, 4, "stdin") == 4
    with pytest.raises(AgentBadResponse):
        validate.chunk(b"x" * (validate.MAX_CHUNK + 1), "stdout")
    with pytest.raises(AgentBadResponse):
        validate.string("v" * 300, "agent version")
    with pytest.raises(AgentBadResponse):
        validate.strings(["9p"] * (validate.MAX_LIST + 1), "storage handler")
    with pytest.raises(AgentBadResponse):
        validate.block_size(3 << 20)
    assert validate.block_size(128 << 20) == 128 << 20
    assert validate.block_size(0) == 0
    with pytest.raises(AgentBadResponse):
        validate.cpu_count(validate.MAX_CPUS + 1, "x")
    with pytest.raises(AgentBadResponse):
        validate.stat_map({f"k{i}": i for i in range(validate.MAX_LIST + 1)}, "memory.stat")


@pytest.mark.parametrize("cid", ["", "../etc", "a/b", "a..b", "-a", "x" * 77, "a\nb", "é"])
def test_bad_container_ids_are_dropped(cid: str) -> None:
    assert validate.container_id(cid) is None


@pytest.mark.parametrize("cid", ["c1", "a" * 64, "my-pod_1.web"])
def test_good_container_ids_pass(cid: str) -> None:
    assert validate.container_id(cid) == cid
