"""`bench run --shard i/n`: n disjoint slices of a run's cells with about equal expected cost.

Cost model (a relative unit, no clock): a cell costs its transfer steps x batch x pixels x width^2
x processes (the work of a DCGAN-like step grows with the image area and the square of the channel
width), and the first cell of a source in a shard also pays for pretraining that source (the same
product with the source steps). The cells that share a source (same source data, network, setup
and seed) form a group; a group is kept in one
shard unless splitting it shortens the longest shard. When it is split, every shard holding part of
it pays for the source: with the cache on shared storage the first shard trains it and the others
wait on the cache lock, with separate caches each trains its own (identical) copy.

The split is a pure function of the cells (in plan order) and n, so every job of an array computes
the same shards; within a shard, cells keep their plan order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.matrix import Cell, Matrix
from ganlib.errors import UserError
from ganlib.strategies import STRATEGIES

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """The `index`-th (1-based) of `count` slices of a run."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def label(self) -> str:
        """A file-name-safe form: `shard-3of16`."""
        return f"shard-{self.index}of{self.count}"


def parse_shard(text: str) -> Shard:
    """`i/n` with 1 <= i <= n; anything else is a UserError naming the value."""
    match = _SHARD.match(str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UserError(f"--shard {text}: expected i/n with 1 <= i <= n, e.g. --shard 1/16 for the first of 16 jobs")
    return Shard(int(match.group(1)), int(match.group(2)))


def _step_cost(matrix: Matrix, cell: Cell) -> float:
    batch = int(matrix.train.get("batch", 64))
    return float(batch * cell.network.size ** 2 * cell.network.width ** 2 * matrix.setup(cell.setup).num_processes)


def cell_cost(matrix: Matrix, cell: Cell) -> float:
    """Expected cost of the cell's transfer (relative units)."""
    return matrix.transfer_steps * _step_cost(matrix, cell)


def source_cost(matrix: Matrix, cell: Cell) -> float:
    """Expected cost of pretraining the cell's source (0 for a strategy that loads none: scratch)."""
    return matrix.source_steps * _step_cost(matrix, cell) if _loads_source(cell) else 0.0


def source_group(cell: Cell) -> tuple | None:
    """Cells with equal groups share one pretrained source; None for a strategy that loads none (scratch)."""
    if not _loads_source(cell):
        return None
    return (str(cell.pair.source), cell.network, cell.setup, cell.seed)  # a source is trained with the cell's seed


def _loads_source(cell: Cell) -> bool:
    """Whether the cell needs a pretrained source (a pair whose source is a checkpoint pretrains none)."""
    return STRATEGIES.get(cell.strategy.name).loads_source and cell.pair.source is not None


def _group_key(cell: Cell) -> tuple:
    return source_group(cell) or ("scratch", cell.id)


def _chunks(cells: list[Cell], parts: int) -> list[list[Cell]]:
    """`cells` cut into min(parts, len) contiguous runs of near-equal length."""
    parts = min(parts, len(cells))
    size, extra = divmod(len(cells), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(cells[start:end])
        start = end
    return out


def _assign(matrix: Matrix, chunks: list[tuple[tuple, list[Cell]]], n: int) -> tuple[float, dict[str, int]]:
    """Longest-processing-time-first: each chunk (largest first) to the shard where it ends earliest."""
    def cost(key: tuple, cells: list[Cell], holds_source: bool) -> float:
        return sum(cell_cost(matrix, c) for c in cells) + (0.0 if holds_source else source_cost(matrix, cells[0]))

    loads = [0.0] * n
    sources: list[set] = [set() for _ in range(n)]
    shard_of: dict[str, int] = {}
    order = sorted(range(len(chunks)), key=lambda i: -cost(*chunks[i], False))  # stable: plan order on ties
    for i in order:
        key, cells = chunks[i]
        best = min(range(n), key=lambda s: (loads[s] + cost(key, cells, key in sources[s]), s))
        loads[best] += cost(key, cells, key in sources[best])
        sources[best].add(key)
        shard_of.update((c.id, best) for c in cells)
    return max(loads), shard_of


def split(matrix: Matrix, cells: list[Cell], n: int) -> list[list[Cell]]:
    """The n shards of `cells` (each in plan order); together exactly `cells`, none twice."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell), []).append(cell)
    best: tuple[float, dict[str, int]] | None = None
    for parts in range(1, max((len(g) for g in groups.values()), default=1) + 1):
        chunks = [(key, chunk) for key, group in groups.items() for chunk in _chunks(group, parts)]
        makespan, shard_of = _assign(matrix, chunks, n)
        if best is None or makespan < best[0] * (1 - 1e-9):  # split a group only when it helps
            best = (makespan, shard_of)
    shard_of = best[1] if best else {}
    return [[c for c in cells if shard_of[c.id] == s] for s in range(n)]


def shard_cells(matrix: Matrix, cells: list[Cell], shard: Shard | None) -> list[Cell]:
    """The cells of `shard` (all of `cells` when None)."""
    if shard is None:
        return cells
    return split(matrix, cells, shard.count)[shard.index - 1]


def cost_share(matrix: Matrix, part: list[Cell], cells: list[Cell]) -> float:
    """The fraction of the expected cost of `cells` (sources counted once) that `part` carries."""
    def total(group: list[Cell]) -> float:
        firsts = {_group_key(c): c for c in reversed(group)}
        return sum(cell_cost(matrix, c) for c in group) + sum(source_cost(matrix, c) for c in firsts.values())

    whole = total(cells)
    return total(part) / whole if whole else 0.0
