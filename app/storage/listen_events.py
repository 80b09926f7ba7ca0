"""PostgreSQL: the ``duplex_events`` channel, on which each commit announces its events.

The commit path (``duplex.storage.outbox.notify_new_events``) sends, at the commit of every
batch that wrote domain events, ``NOTIFY duplex_events`` with a JSON array of
``{"task_uuid", "first", "last"}``: the new sequence range of each task. External
consumers can LISTEN for it and read the rows; Duplex's relay and ``duplex events
--follow`` use it to wake up at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from duplex.storage.listen import ChannelListener
from duplex.storage.outbox import CHANNEL

__all__ = ["CHANNEL", "EventListener", "SequenceRange", "parse_payload"]


@dataclass(frozen=True, slots=True)
class SequenceRange:
    """New events of one task: sequences ``first`` to ``last``, inclusive."""

    task_uuid: str
    first: int
    last: int


def parse_payload(payload: str) -> list[SequenceRange]:
    """Read one notification's payload; an unreadable one yields nothing."""
    try:
        items = json.loads(payload)
        return [SequenceRange(str(i["task_uuid"]), int(i["first"]), int(i["last"])) for i in items]
    except (ValueError, TypeError, KeyError):
        return []


class EventListener(ChannelListener):
    """LISTENs on ``duplex_events``; ``on_events`` gets the ranges of each notification.

    After every (re)connect it gets an empty list, since what was committed meanwhile was not
    announced to this listener.
    """

    def __init__(
        self,
        url: str,
        on_events: Callable[[list[SequenceRange]], None],
        *,
        reconnect_max_s: float = 10.0,
    ) -> None:
        super().__init__(
            url,
            CHANNEL,
            on_connect=lambda: on_events([]),
            on_notify=lambda payload: on_events(parse_payload(payload)),
            name="duplex-events-listen",
            reconnect_max_s=reconnect_max_s,
        )
