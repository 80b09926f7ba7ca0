"""Flow control (docs/flow-control.md): limits that follow what they protect, not the worker.

``concurrency``: a step's concurrency key (``concurrency = { key = "context.customer_id",
limit = N }``), how a template declares it and how a task's values make it a key. The SQL that
holds steps back and lets them go is ``duplex.storage.concurrency``; pausing a namespace is
``duplex.storage.pauses``.
"""
