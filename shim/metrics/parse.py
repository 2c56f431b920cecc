"""Read the text exposition format back into families: the monitor re-labels and merges what each
shim serves. Pure. It reads what `exposition.render` writes (and the common rest of format 0.0.4:
timestamps are dropped, untyped samples skipped); a line it cannot read raises ParseError, so one
malformed shim answer is refused whole rather than half merged.
"""

from __future__ import annotations

import math

from .exposition import (
    HISTOGRAM_SUFFIXES,
    KINDS,
    Family,
    Kind,
    Labels,
    Sample,
    check_label_name,
    check_metric_name,
)

MAX_LINES = 200_000


class ParseError(ValueError):
    pass


def parse(text: str) -> list[Family]:
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise ParseError(f"more than {MAX_LINES} lines")
    for n, line in enumerate(lines, 1):
        try:
            if not line.strip():
                continue
            if line.startswith("#"):
                _comment(line, families, helps)
                continue
            name, labels, value = _sample(line)
            family, suffix = _family_of(name, families)
            if family is None:
                continue  # untyped: we never write those, and a typed merge could not hold them
            family.samples.append(Sample(suffix, labels, value))
        except ValueError as exc:
            raise ParseError(f"line {n}: {exc}") from None
    for name, text_ in helps.items():
        if name in families:
            families[name].help = text_ or families[name].help
    return list(families.values())


def _comment(line: str, families: dict[str, Family], helps: dict[str, str]) -> None:
    parts = line.split(None, 3)
    if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
        return  # a plain comment
    name = check_metric_name(parts[2])
    rest = parts[3] if len(parts) > 3 else ""
    if parts[1] == "HELP":
        helps[name] = _unescape(rest)
        return
    kind = rest.strip()
    if kind not in KINDS:
        raise ValueError(f"unsupported type {kind!r}")
    if name in families:
        raise ValueError(f"second TYPE line for {name}")
    families[name] = Family(name, _as_kind(kind), helps.get(name) or name)


def _as_kind(kind: str) -> Kind:
    for k in KINDS:
        if k == kind:
            return k
    raise ValueError(f"unsupported type {kind!r}")


def _family_of(name: str, families: dict[str, Family]) -> tuple[Family | None, str]:
    if name in families:
        return families[name], ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in families and families[base].kind == "histogram":
            return families[base], suffix
    return None, ""


def _sample(line: str) -> tuple[str, Labels, float]:
    i = 0
    while i < len(line) and line[i] not in "{ \t":
        i += 1
    name = check_metric_name(line[:i])
    labels: list[tuple[str, str]] = []
    if i < len(line) and line[i] == "{":
        i += 1
        while True:
            while i < len(line) and line[i] in " \t,":
                i += 1
            if i < len(line) and line[i] == "}":
                i += 1
                break
            eq = line.index("=", i)
            label = check_label_name(line[i:eq].strip())
            if eq + 1 >= len(line) or line[eq + 1] != '"':
                raise ValueError("label value must be quoted")
            label_value, i = _quoted(line, eq + 2)
            labels.append((label, label_value))
    fields = line[i:].split()
    if not fields or len(fields) > 2:
        raise ValueError("expected a value (and an optional timestamp)")
    value = _number(fields[0])
    if len({k for k, _ in labels}) != len(labels):
        raise ValueError("a label given twice")
    return name, tuple(sorted(labels)), value


def _quoted(line: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    while i < len(line):
        c = line[i]
        if c == "\\":
            nxt = line[i + 1: i + 2]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError("unterminated label value")


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "n\\":
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _number(text: str) -> float:
    special = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    return float(text)  # ValueError for junk
