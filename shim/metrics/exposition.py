"""Prometheus text exposition format 0.0.4: metric families and their rendering. Pure, stdlib only.

A `Family` is one metric (name, type, help) with its samples; `render()` writes families the way
Prometheus (and `promtool check metrics`) reads them: `# HELP` and `# TYPE` once per family, then its
samples, counters named `*_total`, histograms as cumulative `_bucket{le=...}` lines ending in
`le="+Inf"`, then `_sum` and `_count`. Label values are escaped (backslash, double quote, newline),
help text too (backslash, newline). Values are in base units (seconds, bytes), as Prometheus asks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
KINDS: tuple[Kind, ...] = ("counter", "gauge", "histogram")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# the suffixes a histogram's samples add to its family name
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable, one order


def labels_of(values: Mapping[str, str]) -> Labels:
    for name in values:
        check_label_name(name)
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def check_metric_name(name: str) -> str:
    if not METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    return name


def check_label_name(name: str) -> str:
    if not LABEL_NAME.match(name) or name.startswith("__"):
        raise ValueError(f"invalid label name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class Sample:
    """One line: the family name plus `suffix` ("" or a histogram's _bucket/_sum/_count)."""

    suffix: str
    labels: Labels
    value: float


@dataclass(slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_metric_name(self.name)
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown metric type {self.kind!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total")
        if self.kind != "counter" and self.name.endswith("_total"):
            raise ValueError(f"{self.kind} {self.name} must not end in _total")
        if not self.help:
            raise ValueError(f"{self.name}: help text is required")

    def add(self, value: float, labels: Mapping[str, str] | Labels = (), suffix: str = "") -> None:
        pairs = labels_of(labels) if isinstance(labels, Mapping) else labels
        self.samples.append(Sample(suffix, pairs, value))


def gauge(name: str, help: str, values: Iterable[tuple[Mapping[str, str], float]] = ()) -> Family:
    family = Family(name, "gauge", help)
    for labels, value in values:
        family.add(value, labels)
    return family


def counter(name: str, help: str, values: Iterable[tuple[Mapping[str, str], float]] = ()) -> Family:
    family = Family(name, "counter", help)
    for labels, value in values:
        family.add(value, labels)
    return family


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def render(families: Iterable[Family]) -> str:
    """The exposition text of `families`; families of one name must have been merged (merge())."""
    out: list[str] = []
    seen: set[str] = set()
    for family in families:
        if family.name in seen:
            raise ValueError(f"metric family {family.name} rendered twice")
        seen.add(family.name)
        out.append(f"# HELP {family.name} {escape_help(family.help)}")
        out.append(f"# TYPE {family.name} {family.kind}")
        for s in family.samples:
            out.append(f"{family.name}{s.suffix}{format_labels(s.labels)} {format_value(s.value)}")
    return "\n".join(out) + "\n" if out else ""


def with_labels(family: Family, extra: Labels) -> Family:
    """`family` with `extra` labels on every sample (they win over a sample's own of the same name)."""
    names = {k for k, _ in extra}
    out = Family(family.name, family.kind, family.help)
    for s in family.samples:
        merged = tuple(sorted([*(p for p in s.labels if p[0] not in names), *extra]))
        out.samples.append(Sample(s.suffix, merged, s.value))
    return out


def merge(families: Iterable[Family]) -> list[Family]:
    """One family per name, samples concatenated in order; a family whose type contradicts the first
    of its name is dropped (it could not be rendered under one `# TYPE`)."""
    by_name: dict[str, Family] = {}
    for family in families:
        first = by_name.get(family.name)
        if first is None:
            by_name[family.name] = Family(family.name, family.kind, family.help, list(family.samples))
        elif first.kind == family.kind:
            first.samples.extend(family.samples)
    return list(by_name.values())


# --- live metrics: what the shim updates as things happen ------------------------------------------
DEFAULT_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                      5.0, 10.0, 30.0, 60.0)


class Counter:
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        self.family = Family(name, "counter", help)  # validates the name
        self.label_names = tuple(check_label_name(n) for n in label_names)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.family.name}: a counter only goes up")
        key = _key(self.family.name, self.label_names, labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def collect(self) -> Family:
        out = Family(self.family.name, "counter", self.family.help)
        out.samples = [Sample("", k, v) for k, v in self._values.items()]
        return out


class Histogram:
    def __init__(self, name: str, help: str, label_names: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.family = Family(name, "histogram", help)
        self.label_names = tuple(check_label_name(n) for n in label_names)
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is the histogram's own label")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and finite")
        self.buckets = tuple(bounds)
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket (+Inf last), [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = _key(self.family.name, self.label_names, labels)
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value

    def collect(self) -> Family:
        out = Family(self.family.name, "histogram", self.family.help)
        for key, (counts, total) in self._series.items():
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = "+Inf" if math.isinf(bound) else format_value(bound)
                out.samples.append(Sample("_bucket", tuple(sorted((*key, ("le", le)))), running))
            out.samples.append(Sample("_sum", key, total[0]))
            out.samples.append(Sample("_count", key, running))
        return out


def _key(name: str, label_names: tuple[str, ...], labels: Mapping[str, str]) -> Labels:
    if set(labels) != set(label_names):
        raise ValueError(f"{name}: labels {sorted(labels)} given, {sorted(label_names)} expected")
    return tuple(sorted((k, str(v)) for k, v in labels.items()))
