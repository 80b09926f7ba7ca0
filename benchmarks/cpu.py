"""Where a run's CPU went, read from /proc: the worker processes, the PostgreSQL server, the rest.

On a machine whose cores the database server shares, CPU per step bounds what more worker
processes can give: with every core busy, the rate cannot pass ``cores / (CPU per step)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(stat: str) -> float:
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _postgres_server_cpu_s() -> float:
    """CPU of every process named postgres (backends, WAL writer, checkpointer...)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().startswith("postgres"):
                total += _process_cpu_s((entry / "stat").read_text())
        except OSError:  # the process exited meanwhile
            continue
    return total


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one instant."""

    machine_busy_s: float
    postgres_s: float
    workers_s: float

    @classmethod
    def take(cls, worker_pids: list[int]) -> CpuSample:
        # The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
        # Busy is what ran here: idle, iowait and steal (another guest's turn) are not.
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(ticks[:3]) + ticks[5] + ticks[6]) * _TICK_S
        workers = 0.0
        for pid in worker_pids:
            # A worker that already exited counts 0 here: take samples while they run.
            try:
                workers += _process_cpu_s(Path(f"/proc/{pid}/stat").read_text())
            except OSError:
                continue
        return cls(busy, _postgres_server_cpu_s(), workers)


@dataclass(frozen=True)
class CpuUse:
    """CPU spent between two samples, over ``wall_s`` seconds of ``cores`` cores."""

    machine_s: float
    postgres_s: float
    workers_s: float
    wall_s: float
    cores: int

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample, wall_s: float) -> CpuUse:
        return cls(
            after.machine_busy_s - before.machine_busy_s,
            after.postgres_s - before.postgres_s,
            after.workers_s - before.workers_s,
            wall_s,
            os.cpu_count() or 1,
        )

    def per_step_ms(self, steps: int) -> tuple[float, float, float]:
        """Milliseconds of CPU per step: workers, PostgreSQL, everything else."""
        other = max(0.0, self.machine_s - self.postgres_s - self.workers_s)
        ms = 1000 / steps
        return self.workers_s * ms, self.postgres_s * ms, other * ms

    def ceiling(self, steps: int) -> float:
        """Steps per second with every core busy at this CPU per step."""
        return self.cores * steps / self.machine_s if self.machine_s else float("inf")

    @property
    def busy_share(self) -> float:
        """The share of the machine's cores that was busy."""
        return self.machine_s / (self.cores * self.wall_s) if self.wall_s else 0.0
