"""CRI PortForward (kubectl port-forward, critest's "Streaming: portforward") into a kata-py pod.

containerd serves PortForward by entering the pod's netns on the host and dialing localhost:PORT
there; the shim's listener and iptables REDIRECT in that netns hand each connection to the agent,
which connects to the port inside the VM. Tested both ways containerd's code is reached: the URL CRI
PortForward returns, dialed over WebSocket (`v4.channel.k8s.io`: kubelet's streaming server takes it
as well as SPDY), and a connection made inside the pod's netns exactly as containerd makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.k8s.cri.v1 import api_pb2 as cri
from protos.k8s.cri.v1 import api_pb2_grpc as cri_grpc
from shim.network.netns import run_in_netns
from shim.portforward import COMMENT
from tests.support.containerd import EVERY_RELEASE, RUNTIME_HANDLER, PrivateContainerd
from tests.support.containerd_releases import Release
from tests.support.cri import CriClient, container_config, pod_config, private_cri
from tests.support.k8s_stream import ChannelConnection
from tests.support.vmprocs import qemu_pids, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.vm]

BIG = 4 << 20
# echo on 8080 (cat ends at the client's half-close), a greeting on 8081, a digest on 8082
SERVERS = ("nc -ll -p 8080 -e cat & nc -ll -p 8081 -e echo hello & nc -ll -p 8082 -e sha256sum & "
           "echo started; while :; do sleep 1; done")
REFUSED = 8090


@pytest.fixture
def pod(containerd_release: Release) -> Iterator[tuple[PrivateContainerd, CriClient, str, str]]:
    """A CNI pod with the servers above; yields (containerd, client, pod id, netns path). The pod is
    removed by the test that checks cleanup, or here."""
    with private_cri(release=containerd_release) as (ctd, client, busybox):
        config = pod_config("pf", host_network=False)
        pod_id = client.run_pod_sandbox(config, RUNTIME_HANDLER)
        try:
            cid = client.create_container(pod_id, container_config("srv", busybox, ["sh", "-c", SERVERS]),
                                          config)
            client.start_container(cid)
            netns = netns_of(ctd, pod_id)
            try:
                wait_for(lambda: hello_or_none(netns), 60, "the servers in the pod")
            except AssertionError:
                raise AssertionError(f"no hello from the pod:\n{ctd.log_tail(80)}") from None
            yield ctd, client, pod_id, netns
        finally:
            if client.list_containers(pod_id) or qemu_pids(ctd):
                client.stop_pod_sandbox(pod_id)
                client.remove_pod_sandbox(pod_id)


def hello_or_none(netns: str) -> bool:
    try:
        return direct(netns, 8081, b"") == b"hello\n"
    except OSError:  # reset: nc is not listening yet
        return False


def netns_of(ctd: PrivateContainerd, pod_id: str) -> str:
    """The pod's netns, from its sandbox container's spec (as the shim reads it)."""
    bundle = ctd.dir / "state" / "io.containerd.runtime.v2.task" / "k8s.io" / pod_id
    spec = json.loads((bundle / "config.json").read_text())
    [path] = [ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network"]
    return str(path)


def connect_in(netns: str, port: int) -> socket.socket:
    """What containerd does: a socket made in the pod's netns, connected to localhost:PORT (tcp4)."""
    sock: socket.socket = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(120)
    try:
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def direct(netns: str, port: int, payload: bytes) -> bytes:
    """Send `payload` and half-close while reading to EOF (a thread sends: the echo would stall)."""
    with connect_in(netns, port) as sock:
        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while data := sock.recv(1 << 20):
            got += data
        sender.join()
        return bytes(got)


def nat_rules(netns: str) -> list[str]:
    out = run_in_netns(netns, lambda: subprocess.run(["iptables", "-t", "nat", "-S", "OUTPUT"],
                                                     capture_output=True, text=True, check=True).stdout)
    return [line for line in out.splitlines() if COMMENT in line]


def cri_port_forward_url(client: CriClient, pod_id: str, port: int) -> str:
    stub = cri_grpc.RuntimeServiceStub(client.channel)
    url = stub.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[port]), timeout=60).url
    return f"{url}?port={port}"


class Forwarded:
    """One port over containerd's streaming server: channel 0 data, 1 errors (v4 port-forward)."""

    def __init__(self, client: CriClient, pod_id: str, port: int) -> None:
        self.conn = ChannelConnection(cri_port_forward_url(client, pod_id, port))
        self.errors = b""
        # the server first names the port on each channel (uint16, little-endian)
        self.prefixes: dict[int, bytes] = {}
        while len(self.prefixes) < 2:
            message = self.conn.receive()
            assert message is not None, "closed before naming the port"
            channel, data = message
            self.prefixes[channel] = data
        assert self.prefixes == {0: struct.pack("<H", port), 1: struct.pack("<H", port)}

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), 1 << 16):
            self.conn.send(0, data[i:i + (1 << 16)])

    def receive(self, n: int) -> bytes:
        """Data until `n` bytes or the end (errors collected on the side)."""
        got = bytearray()
        while len(got) < n:
            message = self.conn.receive()
            if message is None:
                break
            channel, data = message
            if channel == 0:
                got += data
            else:
                self.errors += data
        return bytes(got)

    def close(self) -> None:
        self.conn.close()


@EVERY_RELEASE
def test_port_forward_through_the_streaming_server(pod: tuple[PrivateContainerd, CriClient, str, str]):
    """What kubectl port-forward does: the CRI URL over WebSocket, data both ways, byte-exact."""
    _ctd, client, pod_id, netns = pod
    hello = Forwarded(client, pod_id, 8081)
    try:
        assert hello.receive(6) == b"hello\n"
    finally:
        hello.close()
    payload = os.urandom(BIG)
    echo = Forwarded(client, pod_id, 8080)
    try:
        sender = threading.Thread(target=echo.send, args=(payload,))
        sender.start()
        got = echo.receive(BIG)
        sender.join()
        assert len(got) == BIG and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert echo.errors == b""
    finally:
        echo.close()
    refused = Forwarded(client, pod_id, REFUSED)
    try:
        assert refused.receive(1) == b""  # no data: the stream ends (with containerd's error, if any)
    finally:
        refused.close()
    assert len(nat_rules(netns)) == 1


def test_port_forward_as_containerd_dials_and_cleanup(pod: tuple[PrivateContainerd, CriClient, str, str]):
    """A connection made in the pod's netns, as containerd's PortForward makes it: both half-closes,
    4 MiB each way byte-exact, a refused port resets; removing the pod leaves nothing behind."""
    ctd, client, pod_id, netns = pod
    payload = os.urandom(BIG)
    got = direct(netns, 8080, payload)
    assert len(got) == BIG and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    # the guest hears our half-close (sha256sum reads to EOF) and its reply then reaches us
    assert direct(netns, 8082, payload).split()[0].decode() == hashlib.sha256(payload).hexdigest()
    with connect_in(netns, REFUSED) as sock, pytest.raises(ConnectionResetError):
        sock.recv(1)
    # one rule; our listener is on the loopback only
    [rule] = nat_rules(netns)
    port = int(rule.split("--to-ports ")[1].split()[0])
    listening = run_in_netns(netns, lambda: subprocess.run(["ss", "-Hltn"], capture_output=True, text=True,
                                                           check=True).stdout)
    addrs = {line.split()[3] for line in listening.splitlines()}
    assert f"127.0.0.1:{port}" in addrs and all(a.startswith(("127.0.0.1:", "[::1]:")) for a in addrs), addrs
    client.stop_pod_sandbox(pod_id)
    client.remove_pod_sandbox(pod_id)
    wait_for(lambda: not qemu_pids(ctd), 30, "QEMU gone")
    assert not Path(netns).exists() or not nat_rules(netns)
    log = ctd.log.read_text(errors="replace")
    assert "loopback connections go to the guest" in log and f"port {REFUSED}:" in log  # the shim's
    assert "rule not removed" not in log

