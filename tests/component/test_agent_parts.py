"""The agent's pure-ish parts without a runtime: reaper, spec rewriting, command line, cgroup files,
CPU/memory onlining on a fake sysfs, OOM fan-out, the virtio-serial bridge over a socketpair."""

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import cgroups, guest
from agent.channel import SerialBridge, find_serial_port
from agent.cmdline import Channel, parse_cmdline
from agent.errors import InvalidArgument
from agent.oom import OomWatcher
from agent.paths import resolve_inside, validate_id
from agent.reaper import Reaper
from agent.spec import guest_spec, pod_sandbox_id
from agent.stdio import OutputStream


@pytest.fixture
def agent_reaper():
    r = Reaper()
    r.start()
    yield r
    r.stop()


def test_reaper_run_captures_output_and_code(agent_reaper: Reaper) -> None:
    done = agent_reaper.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"])
    assert (done.code, done.stdout, done.stderr) == (4, b"out\n", b"err\n")
    done = agent_reaper.run(["cat"], input=b"abc")
    assert (done.code, done.stdout) == (0, b"abc")


def test_reaper_keeps_status_of_pid_learned_late(agent_reaper: Reaper) -> None:
    # The process exits before anyone asks for it (as a container init may before its pid file is
    # read): the status waits in the reaper's table.
    since = agent_reaper.mark()
    proc = agent_reaper.spawn(["sh", "-c", "kill -TERM $$"])
    time.sleep(0.3)
    assert agent_reaper.wait(proc, since, timeout=5) == 128 + 15
    assert proc.returncode == 128 + 15  # Popen will not waitpid on its own


def test_reaper_concurrent_commands_do_not_steal(agent_reaper: Reaper) -> None:
    codes: dict[int, int] = {}

    def run(i: int) -> None:
        codes[i] = agent_reaper.run(["sh", "-c", f"exit {i}"]).code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert codes == {i: i for i in range(12)}


def test_reaper_ignores_status_from_before_mark(agent_reaper: Reaper) -> None:
    proc = agent_reaper.spawn(["true"])
    time.sleep(0.3)  # reaped and unclaimed
    with pytest.raises(TimeoutError):
        agent_reaper.wait(proc, agent_reaper.mark(), timeout=0.3)  # a recycled pid must not match
    proc.returncode = 0


def test_ids_and_paths(tmp_path: Path) -> None:
    assert validate_id("abc-1.2_3", "container_id") == "abc-1.2_3"
    with pytest.raises(InvalidArgument, match="exec_id"):
        validate_id("--all", "exec_id")
    (tmp_path / "in").mkdir()
    assert resolve_inside(str(tmp_path), str(tmp_path / "in" / "new"), "f") == str(tmp_path / "in" / "new")
    for bad in (str(tmp_path), str(tmp_path / ".." / "x"), "rel", ""):
        with pytest.raises(InvalidArgument, match="mount_point"):
            resolve_inside(str(tmp_path), bad, "mount_point")


def test_guest_spec_rewrite() -> None:
    host = {"process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "root": {"path": "/run/containerd/.../rootfs", "readonly": True},
            "hooks": {"createRuntime": [{"path": "/usr/bin/nvidia"}]},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                                     {"type": "network", "path": "/var/run/netns/cni-1"}],
                      "cgroupsPath": "kubepods.slice:cri-containerd:abc", "mountLabel": "x"}}
    out = guest_spec(host, "c1", "/run/kata-py/shared/containers/c1/rootfs", terminal=True)
    assert out["root"] == {"path": "/run/kata-py/shared/containers/c1/rootfs", "readonly": True}
    assert "hooks" not in out and "mountLabel" not in out["linux"]
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "cgroup"}]
    assert out["linux"]["cgroupsPath"] == "/kata-py/c1"
    assert out["process"] == {"args": ["sh"], "terminal": True}
    assert host["linux"]["namespaces"][1]["path"] == "/proc/42/ns/ipc"  # input untouched


def test_pod_namespaces_map_to_the_sandbox_containers_in_the_guest() -> None:
    host = {"process": {"args": ["sh"]},
            "annotations": {"io.kubernetes.cri.sandbox-id": "pause1"},
            "linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"},
                                     {"type": "ipc", "path": "/proc/42/ns/ipc"},
                                     {"type": "uts", "path": "/proc/42/ns/uts"},
                                     {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
                                     {"type": "mount"}, {"type": "network", "path": "/proc/42/ns/net"}]}}
    assert pod_sandbox_id(host) == "pause1"
    assert pod_sandbox_id({"annotations": {"io.kubernetes.cri-o.SandboxID": "p2"}}) == "p2"
    assert pod_sandbox_id({}) == ""
    joined = guest_spec(host, "c1", "/r", terminal=False, sandbox_init_pid=7)
    assert joined["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/7/ns/pid"}, {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "uts", "path": "/proc/7/ns/uts"}, {"type": "cgroup"}, {"type": "mount"}]
    alone = guest_spec(host, "c1", "/r", terminal=False)  # no running sandbox container: own namespaces
    assert all("path" not in ns for ns in alone["linux"]["namespaces"])


def test_cmdline() -> None:
    assert parse_cmdline("console=ttyS0 quiet").channel == Channel("serial", "agent")
    cfg = parse_cmdline("ro kata_py.channel=vsock:1024 kata_py.log=debug")
    assert (cfg.channel, cfg.log) == (Channel("vsock", "1024"), "debug")
    assert parse_cmdline("kata_py.channel=serial:ch0").channel == Channel("serial", "ch0")
    for bad in ("kata_py.channel=vsock:x", "kata_py.channel=tcp:1", "kata_py.channel=serial:"):
        with pytest.raises(ValueError):
            parse_cmdline(bad)


def test_cgroup_stats_and_oom(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (tmp_path / "memory.current").write_text("4096\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.stat").write_text("anon 1024\nfile 2048\n")
    (tmp_path / "pids.current").write_text("3\n")
    (tmp_path / "pids.max").write_text("100\n")
    s = cgroups.read_stats(str(tmp_path))
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (1_500_000, 1_000_000, 500_000)
    assert (s.memory_usage, s.memory_max_usage, s.memory_limit, s.memory_cache) == (4096, 4096, cgroups.UNLIMITED, 2048)
    assert (s.pids_current, s.pids_limit) == (3, 100)
    assert cgroups.read_stats(str(tmp_path / "gone")).cpu_usage_ns == 0

    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    watcher = OomWatcher(lambda: [("c1", str(tmp_path))])
    q = watcher.subscribe()
    watcher.poll_once()
    assert q.empty()
    events.write_text("oom 2\noom_kill 2\n")
    watcher.poll_once()
    assert [q.get_nowait(), q.get_nowait()] == ["c1", "c1"] and q.empty()
    watcher.poll_once()
    assert q.empty()


def _fake_sysfs(tmp_path: Path, cpus: dict[int, str], blocks: dict[int, str]) -> tuple[Path, Path]:
    cpu = tmp_path / "cpu"
    mem = tmp_path / "memory"
    cpu.mkdir()
    mem.mkdir()
    for n, state in cpus.items():
        (cpu / f"cpu{n}").mkdir(parents=True)
        if n:  # cpu0 has no online file on x86
            (cpu / f"cpu{n}" / "online").write_text(state)
    for n, state in blocks.items():
        (mem / f"memory{n}").mkdir(parents=True)
        (mem / f"memory{n}" / "state").write_text(state)
    (mem / "block_size_bytes").write_text("8000000\n")
    _sync_online(cpu)
    return cpu, mem


def _sync_online(cpu: Path) -> None:
    on = [0] + [int(p.parent.name[3:]) for p in cpu.glob("cpu*/online") if p.read_text().strip() == "1"]
    (cpu / "online").write_text(",".join(str(n) for n in sorted(on)))


def test_online_cpu_mem_on_fake_sysfs(tmp_path: Path) -> None:
    cpu, mem = _fake_sysfs(tmp_path, {0: "", 1: "0", 2: "1"}, {0: "online", 1: "offline", 2: "offline"})
    assert guest.online_cpus(str(cpu)) == 1
    _sync_online(cpu)
    assert guest.count_online_cpus(str(cpu)) == 3
    assert guest.online_memory(str(mem)) == 2
    assert (mem / "memory1" / "state").read_text() == "online_movable"
    assert guest.details(str(cpu), str(mem)).mem_block_size_bytes == 128 * 1024 * 1024


def test_online_cpu_waits_for_hotplugged_cpu(tmp_path: Path) -> None:
    cpu, mem = _fake_sysfs(tmp_path, {0: ""}, {})

    def hotplug() -> None:  # the vCPU shows up a little after the QMP call, like on real guests
        time.sleep(0.1)
        (cpu / "cpu1").mkdir()
        (cpu / "cpu1" / "online").write_text("1")
        _sync_online(cpu)

    t = threading.Thread(target=hotplug)
    t.start()
    cpus, _ = guest.online_cpu_mem(2, cpu_only=True, sys_cpu=str(cpu), sys_memory=str(mem), delay=0.02)
    t.join()
    assert cpus == 2
    with pytest.raises(Exception, match="of 3 cpus"):
        guest.online_cpu_mem(3, cpu_only=True, sys_cpu=str(cpu), sys_memory=str(mem), retries=3, delay=0.01)


def test_output_stream_drains_after_writer_closed() -> None:
    r, w = os.pipe()

    def writer() -> None:  # more than a pipe buffer and a chunk, then EOF
        with os.fdopen(w, "wb") as f:
            f.write(b"a" * 300_000)

    t = threading.Thread(target=writer)
    t.start()
    s = OutputStream(r)
    assert b"".join(s.chunks(lambda: True)) == b"a" * 300_000
    t.join()
    assert list(s.chunks(lambda: True)) == []  # at EOF (and closed) further readers end at once


def test_find_serial_port_by_name(tmp_path: Path) -> None:
    sysd = tmp_path / "sys"
    for port, name in (("vport1p1", "console"), ("vport1p2", "agent")):
        (sysd / port).mkdir(parents=True)
        (sysd / port / "name").write_text(name + "\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "vport1p2").touch()
    assert find_serial_port("agent", str(sysd), str(tmp_path / "dev")) == str(tmp_path / "dev" / "vport1p2")
    with pytest.raises(FileNotFoundError):
        find_serial_port("nope", str(sysd), str(tmp_path / "dev"), timeout=0.05)


def test_serial_bridge_drops_local_connection_on_host_eof(tmp_path: Path) -> None:
    """A socketpair stands in for the port: bytes reach a local server, replies come back, and a host
    disconnect (EOF on the port) drops the local connection so the next host starts afresh."""
    sock_path = str(tmp_path / "local.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock_path)
    server.listen(4)
    host, port = socket.socketpair()
    bridge = SerialBridge(port.fileno(), sock_path)
    t = threading.Thread(target=bridge.run)
    t.start()
    try:
        host.sendall(b"hello")
        conn1, _ = server.accept()
        assert conn1.recv(100) == b"hello"
        conn1.sendall(b"reply")
        assert host.recv(100) == b"reply"
        # Host goes away: on a real port read() returns 0; a socketpair shows it as EOF too.
        host.shutdown(socket.SHUT_WR)
        assert conn1.recv(100) == b""  # the bridge dropped the local connection
        conn1.close()
    finally:
        bridge.stop()
        t.join(5)
        host.close()
        port.close()
        server.close()
    assert not t.is_alive()
