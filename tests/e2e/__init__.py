"""End to end: several parts together, most as real subprocesses under faults."""
