"""Metrics, logs, traces, saturation warnings and the HTTP port."""
