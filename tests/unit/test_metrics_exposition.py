"""shim/metrics: the text exposition format we write and read back (pure), checked against
Prometheus's own linter (`promtool check metrics`, Debian's prometheus package: scripts/setup-host.sh)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from shim.metrics.exposition import Counter, Family, Histogram, counter, gauge, merge, render, with_labels
from shim.metrics.parse import ParseError, parse
from shim.metrics.procfs import parse_smaps_rollup, parse_stat
from shim.metrics.timing import TimingMetrics, parse_timing


def test_counter_gauge_and_label_escaping():
    c = Counter("kata_py_things_total", "Things.", ["kind"])
    c.inc(kind='a "quoted"\\ \nname')
    c.inc(2, kind='a "quoted"\\ \nname')
    text = render([c.collect(), gauge("kata_py_level_bytes", "Level\\ with\nnewline.", [({}, 1.5)])])
    assert text == (
        "# HELP kata_py_things_total Things.\n"
        "# TYPE kata_py_things_total counter\n"
        'kata_py_things_total{kind="a \\"quoted\\"\\\\ \\nname"} 3\n'
        "# HELP kata_py_level_bytes Level\\\\ with\\nnewline.\n"
        "# TYPE kata_py_level_bytes gauge\n"
        "kata_py_level_bytes 1.5\n")


def test_histogram_buckets_are_cumulative_and_end_in_inf():
    h = Histogram("kata_py_op_duration_seconds", "Op time.", ["op"], buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v, op="x")
    text = render([h.collect()])
    assert text.splitlines()[2:] == [
        'kata_py_op_duration_seconds_bucket{le="0.1",op="x"} 2',
        'kata_py_op_duration_seconds_bucket{le="1",op="x"} 3',
        'kata_py_op_duration_seconds_bucket{le="+Inf",op="x"} 4',
        'kata_py_op_duration_seconds_sum{op="x"} 7.65',
        'kata_py_op_duration_seconds_count{op="x"} 4',
    ]


@pytest.mark.parametrize("bad", [
    lambda: Family("1bad", "gauge", "h"),
    lambda: Family("kata_py_x", "counter", "h"),  # a counter without _total
    lambda: Family("kata_py_x_total", "gauge", "h"),
    lambda: Family("kata_py_x", "gauge", ""),
    lambda: Family("kata_py_x", "summary", "h"),  # type: ignore[arg-type]
    lambda: Histogram("kata_py_h_seconds", "h", ["le"]),
    lambda: Counter("kata_py_c_total", "h", ["__reserved"]),
    lambda: Counter("kata_py_c_total", "h", ["a"]).inc(-1, a="x"),
    lambda: Counter("kata_py_c_total", "h", ["a"]).inc(b="x"),
    lambda: render([gauge("kata_py_g", "h"), gauge("kata_py_g", "h")]),
])
def test_invalid_metrics_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_special_values():
    text = render([gauge("kata_py_g", "h", [({"a": "1"}, math.inf), ({"a": "2"}, -math.inf), ({"a": "3"}, math.nan),
                                             ({"a": "4"}, 1e20), ({"a": "5"}, 7)])])
    assert [line.split()[-1] for line in text.splitlines()[2:]] == ["+Inf", "-Inf", "NaN", "1e+20", "7"]


def test_parse_round_trip_relabel_and_merge():
    h = Histogram("kata_py_op_duration_seconds", "Op time.", ["op"], buckets=(0.1,))
    h.observe(0.2, op='q"uo\\te')
    c = counter("kata_py_c_total", "C.", [({"x": "1"}, 2)])
    text = render([h.collect(), c])
    families = parse(text)
    assert render(families) == text
    one = [with_labels(f, (("pod", "a"),)) for f in families]
    two = [with_labels(f, (("pod", "b"), ("x", "mine"))) for f in parse(text)]
    merged = merge([*one, *two])
    out = render(merged)
    assert out.count("# TYPE kata_py_c_total counter") == 1
    assert 'kata_py_c_total{pod="a",x="1"} 2' in out
    assert 'kata_py_c_total{pod="b",x="mine"} 2' in out  # the monitor's labels win
    assert 'kata_py_op_duration_seconds_count{op="q\\"uo\\\\te",pod="b",x="mine"} 1' in out


def test_merge_drops_a_family_of_another_type():
    merged = merge([gauge("kata_py_g", "h", [({}, 1)]), counter("kata_py_g_total", "h"),
                    Family("kata_py_g", "histogram", "h")])
    assert [(f.name, f.kind, len(f.samples)) for f in merged] == [("kata_py_g", "gauge", 1),
                                                                 ("kata_py_g_total", "counter", 0)]


@pytest.mark.parametrize("text", [
    "kata_py_x{a=\"1\"} 1\n# TYPE kata_py_x gauge\n# TYPE kata_py_x gauge\n",
    "# TYPE kata_py_x gauge\nkata_py_x{a=1} 1\n",
    "# TYPE kata_py_x gauge\nkata_py_x{a=\"1} 1\n",
    "# TYPE kata_py_x gauge\nkata_py_x one\n",
    "# TYPE kata_py_x gauge\nkata_py_x{a=\"1\",a=\"2\"} 1\n",
    "# TYPE kata_py_x summary\n",
    "# TYPE 0x gauge\n",
])
def test_parse_refuses_malformed_text(text):
    with pytest.raises(ParseError):
        parse(text)


def test_parse_skips_untyped_and_timestamps():
    families = parse("# a comment\nuntyped_thing 1\n# TYPE kata_py_g gauge\nkata_py_g 2 1700000000000\n")
    assert render(families) == "# HELP kata_py_g kata_py_g\n# TYPE kata_py_g gauge\nkata_py_g 2\n"


def test_proc_stat_and_smaps_rollup():
    stat = ("4242 (qemu-system-x86 (x) y) S 1 2 3 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 7 0 123 "
            "1000000 2048 18446744073709551615")
    fields = parse_stat(stat)
    assert (fields.utime_ticks, fields.stime_ticks, fields.threads, fields.rss_pages) == (250, 75, 7, 2048)
    with pytest.raises(ValueError):
        parse_stat("4242 (x) S 1")
    rollup = "55-7f ---p 00000000 00:00 0 [rollup]\nRss:     1608 kB\nPss:      253 kB\nJunk: x\n"
    assert parse_smaps_rollup(rollup) == {"Rss": 1608 * 1024, "Pss": 253 * 1024}


def test_timing_lines_become_histograms():
    assert parse_timing("timing sandbox=abc vm_restore=0.5 agent_ready=0.25 accel=tcg boot=template total=1.0") \
        == ("sandbox", "abc", {"vm_restore": 0.5, "agent_ready": 0.25, "total": 1.0},
            {"accel": "tcg", "boot": "template"})
    assert parse_timing("sandbox abc: accelerator tcg") is None
    t = TimingMetrics()
    t.observe("timing sandbox=abc vm_restore=0.5 agent_ready=0.25 accel=tcg boot=template total=1.0")
    t.observe("timing shim=abc pid=42 start_cmd=0.1 daemon_init=0.4 spare=1")
    t.observe("timing container=c1 resized=0.0 rootfs=0.01 mounts=0.0 agent_create=0.3 total=0.31")
    t.observe("timing lifecycle=c1 create=2.0 to_start=0.01 start=0.1 delete=0.2")
    t.observe("timing template=k1 template_build=20.5 sandbox=abc total=20.5")
    text = render(t.collect())
    assert 'kata_py_sandbox_boots_total{accel="tcg",boot="template"} 1' in text
    assert 'kata_py_sandbox_start_phase_duration_seconds_count{phase="vm_restore"} 1' in text
    assert 'kata_py_sandbox_start_duration_seconds_sum{boot="template"} 1' in text
    assert 'kata_py_shim_start_phase_duration_seconds_sum{phase="daemon_init"} 0.4' in text
    assert 'kata_py_shim_start_phase_duration_seconds_count{phase="pid"}' not in text
    assert 'kata_py_container_create_phase_duration_seconds_count{phase="agent_create"} 1' in text
    assert 'kata_py_task_lifecycle_phase_duration_seconds_sum{phase="create"} 2' in text
    assert "kata_py_template_build_duration_seconds_sum 20.5" in text


def _everything() -> str:
    """One of each kind of family the shim and the monitor serve, with awkward label values."""
    from agent_client.protocol import ContainerStats, CpuStats, MemoryStats, PidsStats
    from shim.metrics.pod import _container_families, _overhead, _process_families
    from shim.metrics.procfs import ProcessStats

    t = TimingMetrics()
    t.observe("timing sandbox=abc vm_launch=5.5 agent_port=0.5 agent_ready=0.25 accel=tcg boot=cold total=6.25")
    t.observe("timing lifecycle=c1 create=2.0 start=0.1")
    rpc = Histogram("kata_py_shim_rpc_duration_seconds", "Task API time.", ["method"])
    rpc.observe(0.003, method="Create")
    procs = {"shim": ProcessStats(1.5, 0.5, 4, 40 << 20, 30 << 20, 12),
             "qemu": ProcessStats(10.0, 3.0, 9, 300 << 20, None, 40)}
    stats = {'c"1\n': ContainerStats(CpuStats(2_000_000_000, (), 500_000_000, 1_500_000_000),
                                     MemoryStats(usage=8 << 20, limit=256 << 20), PidsStats(3, 0))}
    families = [rpc.collect(), *t.collect(), *_process_families(procs), *_container_families(stats),
                _overhead(procs, stats)]
    return render(merge(with_labels(f, (("cri_pod_name", "web"), ("sandbox_id", "x\\y"))) for f in families))


def test_promtool_accepts_what_we_serve(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/setup-host.sh installs Debian's prometheus package"
    text = _everything()
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        f"{done.stdout.decode()}{done.stderr.decode()}\n{text}"
    # and it does complain about what Prometheus's conventions forbid: the check can fail
    bad = "# HELP kata_py_latency_milliseconds x\n# TYPE kata_py_latency_milliseconds gauge\nkata_py_latency_milliseconds 1\n"
    done = subprocess.run([promtool, "check", "metrics"], input=bad.encode(), capture_output=True, timeout=60)
    assert done.returncode != 0 or done.stdout.strip() or done.stderr.strip()
