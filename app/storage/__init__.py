"""Every SQL statement Duplex runs, by concept; scan these modules to see them all.

The worker's path:

* ``claims``            claiming ready steps, handing back claims that never started
* ``results``           applying attempt outcomes under the guard (one transaction per batch)
* ``readiness``         enqueueing children whose parents are all done; parents' results
* ``expansion``         moving a task forward: batch items, skipped branches, waits started
* ``step_store``        what a running handler writes and reads: checkpoints, batch results
* ``task_state``        locking task rows, deriving task states from their steps
* ``events``            the domain events an applied outcome produces (outbox rows)
* ``transitions``       one ``workflow_step_transitions`` row per state change
* ``recovery``          the running attempts of dead workers (``worker_lost``)
* ``workers``           the ``workers`` table: registration, heartbeats, stop, and the one
                        liveness rule (is a recorded worker alive?)
* ``listen``            PostgreSQL LISTEN/NOTIFY: ``duplex_work`` and ``duplex_events``
* ``waits``             the sweep ending waits and sleeps whose time is up (``wait_timeout``)

The outbox of domain events:

* ``outbox``            sequence numbers, the relay's work list and bookkeeping, the lag
* ``event_operations``  what ``duplex events`` lists, retries and skips
* ``retention``         ``duplex prune``: finished tasks and old published events

Operators and readers:

* ``submission``        writing tasks, steps and edges
* ``operations``        operator commands: cancel, retry, resolve, complete
* ``manual``            a step resolved or completed by hand, and the task moved on
* ``signals``           ``duplex signal``: a wait step completed by its signal, or the
                        signal kept until the wait starts
* ``queries``           tasks with their execution status, steps and transitions (for
                        ``duplex status`` and the dashboard), the ready queue's figures
* ``dashboard_list``    the dashboard's task list: filters, pages, status counts
* ``dashboard_detail``  the dashboard's page of one task or step
* ``batch_view``        a batch's items as a group: counts per state, one page of items

Underneath: ``db`` (engines and transactions), ``driver`` (many-row statements at the
driver), ``models`` (the tables), ``schema`` (is the database at head?) and ``migrate``
(migrations under a lock; the revisions are in ``migrations/``).
"""
