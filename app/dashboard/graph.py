"""The DAG drawn as a graph: a layered layout of a task's steps, as plain geometry for SVG.

Columns are dependency depths (a step sits one column right of its deepest parent); within a
column, steps are ordered by where their parents are (the barycenter), so most edges run
straight. A column taller than ``max_rows`` wraps into sub-columns, so a fan-out of 1000
steps stays on the screen (a batch's items are one node, ``pages.graph_steps``). Above
``compact_above`` steps, nodes are small squares (their name is in the tooltip) and above
``max_edges`` edges are not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GraphStep:
    """What the layout needs of a step."""

    key: str
    label: str
    state: str
    parents: tuple[str, ...]
    # Where the node links to; None: the step's own page (a batch's group links to its items).
    href: str | None = None


@dataclass(frozen=True, slots=True)
class Node:
    key: str
    label: str
    state: str
    x: float
    y: float
    width: float
    height: float
    href: str | None = None


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    path: str  # an SVG path: a cubic curve from the parent's right side to the child's left


@dataclass(frozen=True, slots=True)
class Layout:
    nodes: list[Node]
    edges: list[Edge]
    width: float
    height: float
    compact: bool
    edges_hidden: int  # edges left out because there are too many to read


_FULL = (168.0, 34.0, 64.0, 12.0)  # node width, node height, column gap, row gap
_COMPACT = (14.0, 14.0, 28.0, 5.0)
_MARGIN = 8.0


def depths(steps: Sequence[GraphStep]) -> dict[str, int]:
    """Each step's column: 0 for a root, else one more than its deepest parent.

    Parents outside ``steps`` are ignored; a cycle (which templates reject) cannot hang it:
    what is left unresolved goes to column 0.
    """
    known = {step.key for step in steps}
    parents = {step.key: [p for p in step.parents if p in known] for step in steps}
    children: dict[str, list[str]] = {step.key: [] for step in steps}
    for key, ps in parents.items():
        for parent in ps:
            children[parent].append(key)
    waiting = {key: len(ps) for key, ps in parents.items()}
    depth = {key: 0 for key, count in waiting.items() if count == 0}
    frontier = [step.key for step in steps if waiting[step.key] == 0]
    while frontier:
        following = []
        for key in frontier:
            for child in children[key]:
                depth[child] = max(depth.get(child, 0), depth[key] + 1)
                waiting[child] -= 1
                if waiting[child] == 0:
                    following.append(child)
        frontier = following
    for step in steps:
        depth.setdefault(step.key, 0)
    return depth


def layout(
    steps: Sequence[GraphStep],
    *,
    compact_above: int = 120,
    max_rows: int | None = None,
    max_edges: int = 1500,
) -> Layout:
    """Place every step; ``steps`` in template order (ties keep that order)."""
    compact = len(steps) > compact_above
    width, height, column_gap, row_gap = _COMPACT if compact else _FULL
    rows_per_column = max_rows or (40 if compact else 16)
    depth = depths(steps)
    columns: dict[int, list[GraphStep]] = {}
    for step in steps:
        columns.setdefault(depth[step.key], []).append(step)

    row_of: dict[str, float] = {}
    nodes: list[Node] = []
    x = _MARGIN
    tallest = 0
    for column in sorted(columns):
        members = columns[column]
        if column > 0:
            members = sorted(members, key=lambda s: _barycenter(s, row_of))
        for start in range(0, len(members), rows_per_column):
            chunk = members[start : start + rows_per_column]
            for row, step in enumerate(chunk):
                row_of[step.key] = float(start + row)
                y = _MARGIN + row * (height + row_gap)
                nodes.append(Node(step.key, step.label, step.state, x, y, width, height, step.href))
            tallest = max(tallest, len(chunk))
            x += width + column_gap
    total_width = x - column_gap + _MARGIN if nodes else 2 * _MARGIN
    total_height = _MARGIN * 2 + max(0, tallest * (height + row_gap) - row_gap)

    placed = {node.key: node for node in nodes}
    pairs = [(p, step.key) for step in steps for p in step.parents if p in placed]
    edges = [] if len(pairs) > max_edges else [_edge(placed[p], placed[c]) for p, c in pairs]
    return Layout(nodes, edges, total_width, total_height, compact, len(pairs) - len(edges))


def _barycenter(step: GraphStep, row_of: dict[str, float]) -> float:
    rows = [row_of[p] for p in step.parents if p in row_of]
    return sum(rows) / len(rows) if rows else 0.0


def _edge(parent: Node, child: Node) -> Edge:
    x1, y1 = parent.x + parent.width, parent.y + parent.height / 2
    x2, y2 = child.x, child.y + child.height / 2
    bend = max(12.0, (x2 - x1) / 2)
    path = f"M{x1:g},{y1:g} C{x1 + bend:g},{y1:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}"
    return Edge(parent.key, child.key, path)
