"""What a commit tells the rest of the worker: an ``Announcement`` per committed
transaction, and the ``Flush`` of one batch that gathers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from duplex.messages import ClaimedStep
from duplex.storage.results import CommitReport


@dataclass(frozen=True)
class Announcement:
    """What the rest of the worker hears about one committed transaction."""

    report: CommitReport
    # Steps became ready (dependents enqueued, claims released): the intake should look now.
    wake_intake: bool
    # A retry (or a rate limit's tokens) falls due in this many seconds: look then.
    retry_due_in_s: float | None
    # The buffer drained below its high-water mark with this commit: intake may resume.
    caught_up: bool = False
    # The commit failed attempts of lost workers, not results of this one.
    recovery: bool = False

    @property
    def claimed(self) -> list[ClaimedStep]:
        """Dependents claimed for this worker in the same transaction: to dispatch now."""
        return self.report.claimed


@dataclass
class Flush:
    """The result of committing one batch."""

    announcements: list[Announcement] = field(default_factory=list)
    # Called with each announcement as soon as its commit is done: in the one-by-one fallback
    # a result is announced right after its own commit, not after the slowest of the others.
    announce: Callable[[Announcement], None] | None = None
    # The batch was a retry after failed commits.
    retried: bool = False
    # The database failed: what was not committed stays in the buffer.
    failed: bool = False
    # How long to wait before the next try (when ``failed``).
    retry_in_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, announcement: Announcement) -> None:
        self.announcements.append(announcement)
        if self.announce is not None:
            self.announce(announcement)
