"""End to end: several parts together, in subprocesses, under faults."""
