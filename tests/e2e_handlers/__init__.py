"""Handlers imported by the ``duplex`` subprocesses of ``tests/test_cli_e2e.py``."""
