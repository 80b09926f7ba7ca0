"""Handlers imported by the ``duplex`` subprocesses of ``tests/cli/test_cli_e2e.py``."""
