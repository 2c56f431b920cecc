"""Every running pod's metrics in one place (issue #18): what `kata-py metrics` and `kata-py monitor`
(shim/monitor.py) run.

Each pod's shim serves its own metrics on `<state>/sandboxes/<name>/shim-monitor.sock`
(shim/metrics/pod.py). `metrics` prints one pod's as the shim serves them. `monitor` is one HTTP
endpoint (127.0.0.1:8090 by default) for Prometheus: at each scrape it lists the sandbox state dirs,
asks each shim whose answer is older than SCRAPE_TTL_S (so a scrape does not wake every guest; the
shims cache their agent calls too), labels every series with the pod's `sandbox_id`,
`cri_pod_name`, `cri_pod_namespace` and `cri_pod_uid` (the shim's pod.json), and serves the union.
A shim that does not answer within SHIM_TIMEOUT_S is `kata_py_monitor_shim_up 0`, with its last
series kept for up to STALE_AFTER_S.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..layout import sandbox_state_dir, sandboxes_dir
from . import http
from .exposition import CONTENT_TYPE, Family, gauge, labels_of, merge, render, with_labels
from .parse import ParseError, parse
from .pod import POD_FILE, SOCKET_NAME, pod_identity

SCRAPE_TTL_S = 5.0
SHIM_TIMEOUT_S = 3.0
STALE_AFTER_S = 60.0
MAX_SHIM_BYTES = 16 << 20
MAX_POD_FILE_BYTES = 4096


def pod_labels(state_dir: Path) -> dict[str, str]:
    """The pod's labels from its pod.json; the dir's name as its sandbox id when there is none."""
    labels = pod_identity(state_dir.name, {})
    try:
        with open(state_dir / POD_FILE, "rb") as f:
            data = json.loads(f.read(MAX_POD_FILE_BYTES))
    except (OSError, ValueError):
        return labels
    if isinstance(data, dict):
        for key in labels:
            if isinstance(data.get(key), str):
                labels[key] = data[key][:253]
    return labels


def sockets(state_root: str | Path) -> list[Path]:
    """The state dirs of sandboxes whose shim serves metrics."""
    try:
        return sorted(d for d in sandboxes_dir(state_root).iterdir() if (d / SOCKET_NAME).exists())
    except OSError:
        return []


async def scrape_shim(state_dir: Path) -> str:
    """One shim's metrics text. Raises OSError, trio.TooSlowError."""
    status, body = await http.get_unix(str(state_dir / SOCKET_NAME), "/metrics", timeout=SHIM_TIMEOUT_S,
                                       max_bytes=MAX_SHIM_BYTES)
    if status != 200:
        raise http.HttpError(f"HTTP {status}: {body[:200].decode(errors='replace')}")
    return body.decode()


@dataclass
class ShimScrape:
    labels: dict[str, str]
    families: list[Family] = field(default_factory=list)
    at: float = -1e18  # trio clock of the newest answer
    up: bool = False
    duration_s: float = 0.0


class Monitor:
    def __init__(self, state_root: str | Path) -> None:
        self.state_root = state_root
        self.shims: dict[Path, ShimScrape] = {}
        self._lock = trio.Lock()  # one refresh at a time; a concurrent scrape finds it done

    async def collect(self) -> list[Family]:
        async with self._lock:
            dirs = sockets(self.state_root)
            for gone in set(self.shims) - set(dirs):
                del self.shims[gone]
            now = trio.current_time()
            async with trio.open_nursery() as nursery:
                for d in dirs:
                    entry = self.shims.setdefault(d, ShimScrape(pod_labels(d)))
                    if now - entry.at >= SCRAPE_TTL_S:
                        nursery.start_soon(self._refresh, d, entry)
        return self._families()

    async def _refresh(self, state_dir: Path, entry: ShimScrape) -> None:
        entry.labels = pod_labels(state_dir)  # written once the pod runs: may be new since the last look
        t0 = time.monotonic()
        try:
            families = parse(await scrape_shim(state_dir))
        except (OSError, trio.TooSlowError, ParseError, UnicodeDecodeError) as exc:
            entry.up = False
            if trio.current_time() - entry.at > STALE_AFTER_S:
                entry.families = []
            print(f"kata-py monitor: {state_dir.name}: {exc}", file=sys.stderr)
        else:
            extra = labels_of(entry.labels)
            entry.families = [with_labels(f, extra) for f in families]
            entry.up, entry.at = True, trio.current_time()
        entry.duration_s = time.monotonic() - t0

    def _families(self) -> list[Family]:
        up = gauge("kata_py_monitor_shim_up", "1 when the pod's shim answered the monitor's last scrape.")
        took = gauge("kata_py_monitor_shim_scrape_duration_seconds", "Time of the monitor's last scrape of the shim.")
        for entry in self.shims.values():
            up.add(1 if entry.up else 0, entry.labels)
            took.add(entry.duration_s, entry.labels)
        count = gauge("kata_py_monitor_sandboxes", "Sandboxes whose shim serves metrics.", [({}, len(self.shims))])
        return merge([up, took, count, *(f for e in self.shims.values() for f in e.families)])

    async def handle(self, path: str) -> http.Response:
        if path == "/metrics":
            return http.Response(200, render(await self.collect()).encode(), CONTENT_TYPE)
        if path == "/":
            return http.text(200, "kata-py monitor: /metrics")
        return http.text(404, f"no such path {path}: /metrics")


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8090")
    return host.strip("[]"), int(port)


async def serve_monitor(monitor: Monitor, host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    where = listeners[0].socket.getsockname()
    print(f"kata-py monitor: serving http://{host if ':' not in host else f'[{host}]'}:{where[1]}/metrics "
          f"for the sandboxes in {sandboxes_dir(monitor.state_root)}", file=sys.stderr, flush=True)
    await http.serve(listeners, monitor.handle)


def find_sandbox(state_root: str | Path, sandbox: str) -> Path | None:
    """A sandbox's state dir by its id (the dir is named after it, or its hash when long) or by a
    unique prefix of the id (as crictl takes them)."""
    try:
        exact = sandbox_state_dir(state_root, sandbox)
    except Exception:  # not a valid id: no dir can be named after it
        exact = None
    if exact is not None and (exact / SOCKET_NAME).exists():
        return exact
    matches = [d for d in sockets(state_root) if pod_labels(d)["sandbox_id"].startswith(sandbox)]
    return matches[0] if len(matches) == 1 else None
