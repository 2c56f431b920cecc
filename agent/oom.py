"""OOM events: one polling thread watches every container's oom_kill counter and fans events out."""

import queue
import threading
from collections.abc import Callable, Iterable

from agent.cgroups import oom_kills

POLL_INTERVAL = 0.1  # memory.events has no cheap blocking notification without inotify; 100 ms is plenty


class OomWatcher:
    """Polls `containers()` (pairs of container id, cgroup dir) and publishes one event per OOM kill."""

    def __init__(self, containers: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._containers = containers
        self._lock = threading.Lock()  # guards _subscribers and _counts
        self._poll_lock = threading.Lock()  # one poll at a time: the loop's and WaitProcess's
        self._subscribers: list[queue.SimpleQueue[str]] = []
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="oom-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def subscribe(self) -> "queue.SimpleQueue[str]":
        q: queue.SimpleQueue[str] = queue.SimpleQueue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: "queue.SimpleQueue[str]") -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def poll_once(self) -> None:
        """Compare every counter with the last one seen and publish the difference."""
        with self._poll_lock:
            seen: dict[str, int] = {}
            events: list[str] = []
            for cid, cgroup_dir in self._containers():
                n = oom_kills(cgroup_dir)
                seen[cid] = n
                events += [cid] * max(0, n - self._counts.get(cid, 0))
            with self._lock:
                self._counts = seen  # removed containers drop out here
                for cid in events:
                    for q in self._subscribers:
                        q.put(cid)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            self.poll_once()
