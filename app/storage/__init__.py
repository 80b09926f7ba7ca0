"""Every SQL statement Duplex runs, by concept; scan these modules to see them all.

* ``claims``       claiming ready steps, handing back claims that never started
* ``results``      applying attempt outcomes under the guard (one transaction per batch)
* ``readiness``    enqueueing children whose parents are all done
* ``task_state``   locking task rows, deriving task states from their steps
* ``events``       the domain events an applied outcome produces (outbox rows)
* ``transitions``  one ``workflow_step_transitions`` row per state change
* ``recovery``     the running attempts of dead workers (``worker_lost``)
* ``submission``   writing tasks, steps and edges
* ``operations``   operator commands: cancel, retry, resolve
* ``queries``      what ``duplex status`` reads
* ``workers``      the ``workers`` table: registration, heartbeats, stop

Schema and migrations live in ``duplex.storage.models`` and ``migrations/``.
"""
