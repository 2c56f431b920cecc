"""The shim's `timing` lines (shim/timing.py) as histograms.

Every phase the shim already logs — the daemon's start, the sandbox's start phase by phase and how
it booted, each container's create, each task's lifecycle, a template build — is observed here by a
logging handler on the `shim.timing` logger, so no start path carries metrics code of its own.
`parse_timing` is pure.
"""

from __future__ import annotations

import logging

from .exposition import Counter, Family, Histogram

START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TIMING_LOGGER = "shim.timing"


def parse_timing(message: str) -> tuple[str, str, dict[str, float], dict[str, str]] | None:
    """`timing <kind>=<id> k=v ...` → (kind, id, numeric fields, other fields); None for another line."""
    words = message.split()
    if len(words) < 2 or words[0] != "timing" or "=" not in words[1]:
        return None
    kind, _, ident = words[1].partition("=")
    numbers: dict[str, float] = {}
    texts: dict[str, str] = {}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            continue
        try:
            numbers[key] = float(value)
        except ValueError:
            texts[key] = value
    return kind, ident, numbers, texts


class TimingMetrics:
    def __init__(self) -> None:
        self.sandbox_phases = Histogram(
            "kata_py_sandbox_start_phase_duration_seconds",
            "Time of each phase of the sandbox's start (VM launch or restore, agent, network, ...).",
            ["phase"], START_BUCKETS)
        self.sandbox_total = Histogram(
            "kata_py_sandbox_start_duration_seconds", "Time from the sandbox's start until its agent served.",
            ["boot"], START_BUCKETS)
        self.boots = Counter("kata_py_sandbox_boots_total",
                             "Sandboxes started, by how their VM came up (pool, template, cold).",
                             ["boot", "accel"])
        self.container_phases = Histogram(
            "kata_py_container_create_phase_duration_seconds",
            "Time of each phase of a container's create (resize, rootfs, mounts, agent create).",
            ["phase"], START_BUCKETS)
        self.lifecycle = Histogram(
            "kata_py_task_lifecycle_phase_duration_seconds",
            "Time between the moments of a task, from Create to Delete (logged at Delete).",
            ["phase"], START_BUCKETS)
        self.shim_start = Histogram(
            "kata_py_shim_start_phase_duration_seconds",
            "The shim's own start: the start action (start_cmd), the daemon's start-up (daemon_init).",
            ["phase"], START_BUCKETS)
        self.template_build = Histogram(
            "kata_py_template_build_duration_seconds", "Time to build a VM template in the background.",
            (), START_BUCKETS)

    def observe(self, message: str) -> None:
        parsed = parse_timing(message)
        if parsed is None:
            return
        kind, _ident, numbers, texts = parsed
        if kind == "sandbox":
            for phase, seconds in numbers.items():
                if phase != "total":
                    self.sandbox_phases.observe(seconds, phase=phase)
            boot = texts.get("boot", "unknown")
            if "total" in numbers:
                self.sandbox_total.observe(numbers["total"], boot=boot)
            self.boots.inc(boot=boot, accel=texts.get("accel", "unknown"))
        elif kind == "container":
            for phase, seconds in numbers.items():
                self.container_phases.observe(seconds, phase=phase)
        elif kind == "lifecycle":
            for phase, seconds in numbers.items():
                self.lifecycle.observe(seconds, phase=phase)
        elif kind == "shim":
            for phase in ("start_cmd", "daemon_init"):
                if phase in numbers:
                    self.shim_start.observe(numbers[phase], phase=phase)
        elif kind == "template" and "template_build" in numbers:
            self.template_build.observe(numbers["template_build"])

    def collect(self) -> list[Family]:
        return [m.collect() for m in (self.shim_start, self.sandbox_total, self.sandbox_phases, self.boots,
                                      self.container_phases, self.lifecycle, self.template_build)]


class TimingHandler(logging.Handler):
    """Feeds every record of the `shim.timing` logger to a TimingMetrics (never raises)."""

    def __init__(self, metrics: TimingMetrics) -> None:
        super().__init__(logging.INFO)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.metrics.observe(record.getMessage())
        except Exception:  # a metric must never break the log line that fed it
            pass

    @classmethod
    def install(cls, metrics: TimingMetrics) -> TimingHandler:
        handler = cls(metrics)
        logging.getLogger(TIMING_LOGGER).addHandler(handler)
        return handler

    def uninstall(self) -> None:
        logging.getLogger(TIMING_LOGGER).removeHandler(self)
