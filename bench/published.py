"""Published numbers a matrix reproduces (its `published:` block), shown beside the measured ones.

A preset that follows a paper's protocol (fewshot-ffhq) carries the FIDs the papers report, with
the citation, so a report says at once whether a run reproduces the literature. Kept apart from
bench.matrix so the report reads them without building networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ganlib.errors import UserError


@dataclass(frozen=True)
class PublishedFids:
    """FIDs one paper reports for the protocol a matrix follows."""

    citation: str                           # who, what, where in the paper (table or figure)
    fid: dict[str, dict[str, float]]        # pair id -> arm (`finetune`, `finetune+ada`) -> FID
    url: str | None = None                  # where the numbers can be read
    note: str | None = None                 # how the paper's protocol differs from the matrix's, if it does


def parse_published(value: Any, where: str) -> list[PublishedFids]:
    """A `published:` list: [{citation, url, note, fid: {pair id: {arm: FID}}}]."""
    out = []
    for item in (value if isinstance(value, list) else [value]) if value is not None else []:
        if not isinstance(item, dict) or set(item) - {"citation", "url", "note", "fid"} or \
                not isinstance(item.get("citation"), str) or not isinstance(item.get("fid"), dict):
            raise UserError(f"{where}: each published entry needs a citation (text) and fid ({{pair id: {{arm: FID}}}}); "
                            f"optional url, note; got {item!r}")
        fid = {}
        for pair, arms in item["fid"].items():
            if not isinstance(arms, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                                     for v in arms.values()):
                raise UserError(f"{where}: published fid for pair {pair!r} must map arms to FIDs (numbers >= 0), "
                                f"got {arms!r}")
            fid[str(pair)] = {str(arm): float(v) for arm, v in arms.items()}
        out.append(PublishedFids(item["citation"], fid, item.get("url"), item.get("note")))
    return out


def check_published(published: list[PublishedFids], pairs: set[str], strategies: set[str], augments: set[str],
                    where: str) -> None:
    """Published FIDs name the matrix's `pairs` and arms made of `strategies` and `augments` (registered
    names or the matrix's ids): a typo would silently show nothing, while a copy of a preset that drops
    a strategy keeps its published numbers."""
    for source in published:
        for pair, values in source.fid.items():
            if pair not in pairs:
                raise UserError(f"{where}: published fid names pair {pair!r}, which this matrix does not have "
                                f"(pairs: {', '.join(sorted(pairs))}); drop it from published:, or run a preset's "
                                "pairs with --only pair=...")
            for arm in values:
                strategy, _, augment = arm.partition("+")
                if strategy not in strategies or (augment and augment not in augments):
                    raise UserError(f"{where}: published fid for {pair} names arm {arm!r}: expected a strategy "
                                    f"({', '.join(sorted(strategies))}), optionally +augment ({', '.join(sorted(augments))})")
