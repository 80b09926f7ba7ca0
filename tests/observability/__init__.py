"""app/observability/: metrics, health, logs, traces."""
