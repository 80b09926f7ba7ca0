"""How the dashboard's templates show states, times and durations (Jinja2 globals)."""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup


def state_badge(value: str) -> Markup:
    # A plain function, not a template macro: a 1000-step page calls it thousands of times.
    return Markup('<span class="state state-{}">{}</span>').format(value, value.replace("_", " "))


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment is not None else "—"


def when_utc(moment: datetime | None) -> str:
    """A time standing alone (not under a "(UTC)" column header) names its zone."""
    return f"{when(moment)} UTC" if moment is not None else "—"


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "—"
    return seconds(max(0.0, (now - moment).total_seconds())) + " ago"


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"
