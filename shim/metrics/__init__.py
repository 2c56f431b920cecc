"""Prometheus metrics of kata-py (issue #18): our own text-format registry (`exposition`, `parse`),
the per-shim management socket (`pod`, `http`), /proc readings (`procfs`) and the `timing` lines as
histograms (`timing`). docs/architecture.md "Metrics" lists every metric."""
