"""Dynamic workflows (docs/workflows.md): step kinds that shape a task while it runs.

``kinds``: what each kind of step is, how a template declares it and what it stores;
``directives``: ``Decision`` and ``Batch``, the values a decision or batch handler returns, and
how an attempt's return value becomes a result. The SQL that applies them (skipping, creating
items, starting waits, signals, checkpoints) is in ``duplex.storage``.
"""
