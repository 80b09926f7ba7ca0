"""Schedules: templates fired on a cron expression or an interval (docs/time.md, Schedules).

``spec`` computes fire times on an injected clock, ``declaration`` validates what a user
declares (the CLI, the ``Client``, a template's ``[[schedules]]``), ``firing`` decides what a
due fire does (fire, skip, buffer, record as missed), ``poller`` is the worker's periodic
loop. The SQL is in ``duplex.storage.schedules``.
"""
