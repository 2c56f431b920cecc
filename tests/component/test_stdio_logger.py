"""binary:// loggers as real processes (no VM): the contract of containerd's runtime/v2/logging, the
ready handshake and its failures, the end of a logger, and the Task service driving one end to end
with the FakeAgent's output."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import trio

from protos.containerd.runtime.v2.task import shim_pb2 as pb
from shim import binlog
from shim.binlog import LoggerProcess
from shim.errors import DeadlineExceeded, InvalidArgument, Unavailable
from shim.stdio import HostStdio, pump_output
from shim.stdio_uri import parse_output
from tests.component.test_service import bundle, running_shim  # noqa: F401  (fixture)
from tests.support.loggers import RECORDER


def script(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)
    return str(path)


def gone(pid: int) -> bool:
    """Neither running nor a zombie of ours (reaped)."""
    return not os.path.exists(f"/proc/{pid}")


async def start(uri: str, **kw: float) -> tuple[LoggerProcess, int, int]:
    target = parse_output(uri)
    assert target is not None and not isinstance(target, str)
    return await LoggerProcess.start(target, process_id="c1", namespace="ns1", **kw)  # type: ignore[arg-type]


async def test_the_logger_gets_fds_3_4_5_its_environment_and_every_byte(tmp_path: Path):
    logger = script(tmp_path / "logger", RECORDER)
    proc, out_w, err_w = await start(f"binary://{logger}?dir={tmp_path}&x=a%20b")
    try:
        data = os.urandom(300_000)  # more than a pipe holds
        async with trio.open_nursery() as nursery:
            for fd, payload in ((out_w, data), (err_w, b"err\n")):
                nursery.start_soon(trio.lowlevel.FdStream(fd).send_all, payload)
    finally:
        await proc.stop()
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["argv"][1:] == ["dir", str(tmp_path), "x", "a b"]
    assert info["env"] == {"CONTAINER_ID": "c1", "CONTAINER_NAMESPACE": "ns1"}
    # exactly stdin/out/err (/dev/null), 3, 4 and 5: nothing of the shim leaks in
    fds = {int(n): target for n, target in info["fds"].items()}
    assert sorted(fds) == [0, 1, 2, 3, 4, 5], fds
    assert fds[0] == fds[1] == fds[2] == "/dev/null" and fds[3].startswith("pipe:"), fds
    assert (tmp_path / "stdout").read_bytes() == data
    assert (tmp_path / "stderr").read_bytes() == b"err\n"
    assert (tmp_path / "done").exists()  # it exited on EOF by itself
    assert gone(info["pid"])


async def test_binary_v2_needs_a_ready_byte(tmp_path: Path):
    logger = script(tmp_path / "logger", RECORDER)
    proc, out_w, err_w = await start(f"binary-v2://{logger}?dir={tmp_path}&ready-byte=1")
    os.close(out_w)
    os.close(err_w)
    await proc.stop()
    assert (tmp_path / "done").exists()
    with pytest.raises(Unavailable, match="without a byte"):
        await start(f"binary-v2://{logger}?dir={tmp_path}")


async def test_a_logger_that_is_never_ready_is_killed(tmp_path: Path):
    logger = script(tmp_path / "logger", """\
        #!/bin/sh
        echo $$ > "$2"
        exec sleep 600
        """)
    pidfile = tmp_path / "pid"
    with trio.fail_after(5), pytest.raises(DeadlineExceeded, match="not ready within 0.5 s"):
        await start(f"binary://{logger}?pid={pidfile}", ready_timeout=0.5)
    assert gone(int(pidfile.read_text()))


async def test_a_logger_that_exits_at_once_is_an_error(tmp_path: Path):
    logger = script(tmp_path / "logger", "#!/bin/sh\nexit 3\n")
    with pytest.raises(Unavailable, match="exited before it was ready"):
        await start(f"binary://{logger}")


@pytest.mark.parametrize("kind, message", [("missing", "No such file"), ("dir", "not a regular file"),
                                           ("noexec", "not executable")])
async def test_unstartable_loggers_are_invalid_arguments(tmp_path: Path, kind: str, message: str):
    path = tmp_path / kind
    if kind == "dir":
        path.mkdir()
    elif kind == "noexec":
        path.write_text("#!/bin/sh\n")
    with pytest.raises(InvalidArgument, match=message):
        await start(f"binary://{path}")


async def test_stop_escalates_to_sigterm_then_sigkill(tmp_path: Path):
    logger = script(tmp_path / "logger", """\
        #!/bin/sh
        trap '' TERM
        echo $$ > "$2"
        exec 5>&-
        while :; do sleep 1; done
        """)
    pidfile = tmp_path / "pid"
    proc, out_w, err_w = await start(f"binary://{logger}?pid={pidfile}")
    os.close(out_w)
    os.close(err_w)
    with trio.fail_after(5):
        await proc.stop(grace=0.3, term_grace=0.3)
    assert gone(int(pidfile.read_text()))


async def test_close_kills_a_logger_whose_process_never_ran(tmp_path: Path):
    logger = script(tmp_path / "logger", RECORDER)
    io = await HostStdio.open("", f"binary://{logger}?dir={tmp_path}", "", False, process_id="e1", namespace="ns")
    pid = json.loads((tmp_path / "info.json").read_text())["pid"]
    io.close()
    assert gone(pid)


async def test_the_pumps_end_the_logger_before_they_return(tmp_path: Path):
    logger = script(tmp_path / "logger", RECORDER)
    io = await HostStdio.open("", f"binary://{logger}?dir={tmp_path}", "", True, process_id="t", namespace="ns")

    async def chunks() -> object:
        yield b"tty output\r\n"

    await pump_output(chunks(), io, "stdout")  # type: ignore[arg-type]
    assert io.logger is None
    assert (tmp_path / "done").exists()  # a terminal: stderr was closed at open, stdout at EOF
    assert (tmp_path / "stdout").read_bytes() == b"tty output\r\n"
    assert (tmp_path / "stderr").read_bytes() == b""


async def test_task_service_logs_a_containers_output_through_its_logger(bundle: Path, tmp_path: Path):  # noqa: F811
    logs = tmp_path / "logs"
    logs.mkdir()
    logger = script(tmp_path / "logger", RECORDER)
    uri = f"binary://{logger}?dir={logs}"
    async with running_shim() as shim:
        shim.sandbox.agent.script("c1", stdout=[b"out-1\n", b"out-2\n"], stderr=[b"err-1\n"], exit_code=0)
        await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle), stdout=uri, stderr=uri),
                        pb.CreateTaskResponse)
        info = json.loads((logs / "info.json").read_text())
        assert info["env"] == {"CONTAINER_ID": "c1", "CONTAINER_NAMESPACE": "test"}
        await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
        await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
        # the exit is reported once the logger has everything and is gone
        assert (logs / "stdout").read_bytes() == b"out-1\nout-2\n"
        assert (logs / "stderr").read_bytes() == b"err-1\n"
        assert gone(info["pid"])
        await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_task_service_refuses_bad_log_uris(bundle: Path):  # noqa: F811
    async with running_shim() as shim:
        for uri, message in (("binary:///no/such/logger", "No such file"),
                             ("file://relative/x.log", "names host")):
            with pytest.raises(Exception, match=message) as caught:
                await shim.call("Create", pb.CreateTaskRequest(id="c1", bundle=str(bundle), stdout=uri),
                                pb.CreateTaskResponse)
            assert "invalid argument" in str(caught.value)
        assert shim.sandbox.agent.containers == {}  # refused before anything reached the guest


def test_ready_timeout_default_is_bounded():
    assert 0 < binlog.READY_TIMEOUT_S <= 30
