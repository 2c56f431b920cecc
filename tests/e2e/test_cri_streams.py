"""CRI streaming (Exec through containerd's streaming server, as kubectl exec and critest do) into
kata-py containers, and ResizePty: the URL CRI Exec returns is dialled over WebSocket
(`v4.channel.k8s.io`, tests/support/k8s_stream.py); containerd then drives the shim's Exec (with a
terminal and a stdin fifo when asked), Start, ResizePty, CloseIO, Wait and Delete."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from protos.k8s.cri.v1 import api_pb2 as cri
from tests.support.containerd import RUNTIME_HANDLER, PrivateContainerd
from tests.support.cri import CriClient, container_config, pod_config, private_cri
from tests.support.k8s_stream import StreamResult, cri_attach_url, cri_exec_url, run_stream
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]


@dataclass
class Pod:
    ctd: PrivateContainerd
    client: CriClient
    pod_id: str
    config: cri.PodSandboxConfig
    image: str
    cid: str  # a long-running busybox container


@pytest.fixture
def pod() -> Iterator[Pod]:
    with private_cri() as (ctd, client, busybox):
        config = pod_config("streams", host_network=False)
        pod_id = client.run_pod_sandbox(config, RUNTIME_HANDLER)
        try:
            cid = client.create_container(
                pod_id, container_config("sh", busybox, ["sh", "-c", "while :; do sleep 1; done"]), config)
            client.start_container(cid)
            yield Pod(ctd, client, pod_id, config, busybox, cid)
        finally:
            client.stop_pod_sandbox(pod_id)
            client.remove_pod_sandbox(pod_id)
        wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone after RemovePodSandbox")


def stream_exec(pod: Pod, cmd: list[str], *, tty: bool, stdin: bool, stderr: bool = False, data: bytes = b"",
                resize: tuple[int, int] | None = None) -> StreamResult:
    url = cri_exec_url(pod.client.channel, pod.cid, cmd, tty=tty, stdin=stdin, stderr=stderr,
                       timeout=pod.client.timeout)
    result = run_stream(url, stdin=data, resize=resize, timeout=180)
    assert result.closed, (result, pod.ctd.log_tail())
    return result


def test_exec_with_tty_and_stdin_as_critest_does(pod: Pod):
    """critest's 'runtime should support exec with tty=true and stdin=true [Conformance]': echo hello
    with a terminal and an open stdin; the stream ends with the command and a Success status."""
    result = stream_exec(pod, ["echo", "hello"], tty=True, stdin=True)
    assert result.success, (result, pod.ctd.log_tail())
    assert "hello" in result.stdout.decode(), result
    assert result.stderr == b""


def test_exec_without_tty_keeps_streams_apart(pod: Pod):
    result = stream_exec(pod, ["sh", "-c", "echo out; echo err >&2"], tty=False, stdin=False,
                         stderr=True)
    assert result.success, (result, pod.ctd.log_tail())
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    failing = stream_exec(pod, ["sh", "-c", "exit 7"], tty=False, stdin=False)
    assert failing.status.get("reason") == "NonZeroExitCode", failing
    assert failing.status["details"]["causes"][0]["message"] == "7", failing


def test_exec_tty_reads_stdin(pod: Pod):
    result = stream_exec(pod, ["sh", "-c", "read line; echo got:$line"], tty=True, stdin=True,
                         data=b"typed\n")
    assert result.success, (result, pod.ctd.log_tail())
    assert "got:typed" in result.stdout.decode(), result


def test_resize_reaches_the_exec_terminal(pod: Pod):
    """The resize channel becomes the shim's ResizePty(exec_id) → the agent's TtyWinResize."""
    result = stream_exec(pod, ["sh", "-c", "sleep 3; stty size"], tty=True, stdin=True,
                         resize=(123, 45))
    assert result.success, (result, pod.ctd.log_tail())
    assert "45 123" in result.stdout.decode(), (result, pod.ctd.log_tail())


def test_resize_reaches_the_containers_own_terminal(pod: Pod):
    """A tty container (CRI tty + stdin): Attach's resize becomes ResizePty of the init process."""
    config = container_config("tty", pod.image, ["sh", "-c", "read go; stty size; sleep 600"])
    config.tty, config.stdin = True, True
    cid = pod.client.create_container(pod.pod_id, config, pod.config)
    pod.client.start_container(cid)
    url = cri_attach_url(pod.client.channel, cid, stdin=True, tty=True, timeout=pod.client.timeout)
    # the resize is applied before the shell reads its line and asks the terminal
    result = run_stream(url, resize=(123, 45), stdin=b"go\r", stdin_delay=2, until=b"45 123", timeout=120)
    assert b"45 123" in result.stdout, (result, pod.ctd.log_tail())
