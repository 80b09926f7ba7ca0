"""Handlers imported by the ``duplex`` subprocesses that ``make_duplex`` (``tests/cli/support.py``)
sets up."""
