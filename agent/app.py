"""Wire the agent together (reaper, runtime, containers, sandbox, OOM watcher, gRPC server, warm-up)
and run it until SIGTERM/SIGINT, then tear everything down."""

import logging
import os
import signal
import sys
import threading

import grpc

from agent import cgroups
from agent.containers import Containers
from agent.oci_runtime import OciRuntime, find_runtime
from agent.oom import OomWatcher
from agent.reaper import Reaper
from agent.sandbox import Sandbox
from agent.server import AgentServicer, serve
from agent.spec import CGROUP_PARENT
from agent.warm_up import WarmUp

_SHUTDOWN_TIMEOUT = 10.0


class Agent:
    """The running agent. `start()` serves; `run_until_signalled()` blocks, then `stop()`s."""

    def __init__(self, root: str, address: str, runtime: str = "", guest: bool = False,
                 log_level: str = "info") -> None:
        logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                            format="kata-py-agent %(levelname)s %(name)s: %(message)s")
        self.root = root
        self.address = address
        self.reaper = Reaper()
        name, path = find_runtime(runtime)
        self.runtime = OciRuntime(name, path, os.path.join(root, "runtime"), self.reaper)
        self.containers = Containers(root, self.runtime, self.reaper)
        self.sandbox = Sandbox(root, self.containers, self.reaper, guest=guest)
        self.oom = OomWatcher(lambda: [(c.id, c.cgroup) for c in self.containers.all()])
        self.warm = WarmUp(root, address, self.runtime, self.containers, self.reaper)
        self._stop = threading.Event()
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """Start the reaper, the OOM watcher and the gRPC server. Raises RuntimeError if the address
        cannot be bound."""
        self.reaper.start()
        self.oom.start()
        self._server = serve(self.address, AgentServicer(self.root, self.sandbox, self.containers,
                                                          self.oom, self.reaper))

    def run_until_signalled(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(1.0):
            pass
        self.stop()

    def stop(self) -> None:
        """Stop serving, kill and delete every container, unmount storages. Idempotent."""
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None
        for c in self.containers.all():
            try:
                self.containers.remove(c.id, _SHUTDOWN_TIMEOUT)
            except Exception as e:  # keep tearing down the rest
                logging.getLogger("agent").warning("remove %s at shutdown: %s", c.id, e)
        try:
            self.sandbox.destroy()
        except Exception:
            pass  # no sandbox was created, or its storages are already gone
        self.oom.stop()
        self.reaper.stop()
        try:
            os.rmdir(os.path.join(cgroups.CGROUP_ROOT, CGROUP_PARENT))
        except OSError:
            pass  # never created, or the runtime's own cgroups are still being torn down
        if self.address.startswith("unix:"):
            try:
                os.unlink(self.address[len("unix:"):])
            except OSError:
                pass
