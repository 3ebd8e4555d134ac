"""Verdicts: which strategy wins a pair on FID, by how much, and whether seeds support the claim.

For each (pair, setup) the strategy with the lowest mean FID is compared with the runner-up:
the lead in FID points, whether mean ± std intervals overlap, and Welch's t-test (unequal
variances, two-sided) when both have at least `MIN_SEEDS_FOR_TEST` seeds. The best strategy is
also tested against every other one (`versus`): a close runner-up leaves the top spot open, but
the run can still say which strategies the best one beats, and that is the answer people act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from bench.results import Stat, aggregate, ordered_unique

METRIC = "quality/fid"           # lower is better
MIN_SEEDS_FOR_TEST = 3           # fewer seeds give a t-test too weak to quote
ALPHA = 0.05                     # two-sided significance level


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison; `text` is the one line shown in reports and terminals."""

    pair: str
    setup: str
    best: str | None                 # strategy with the lowest mean FID (None: no results)
    runner_up: str | None            # second lowest (None: fewer than two strategies)
    best_stat: Stat | None
    runner_up_stat: Stat | None
    lead: float | None               # runner-up mean FID - best mean FID (FID points, >= 0)
    lead_pct: float | None           # lead as a percentage of the runner-up's mean FID
    spreads_overlap: bool | None     # mean ± std intervals overlap (None: a std is unknown)
    p_value: float | None            # Welch's t-test, two-sided (None: < 3 seeds on a side)
    significant: bool | None         # p < ALPHA; without a p-value, spreads apart; None: unknown
    text: str
    versus: tuple[tuple[str, float], ...] = ()  # (other strategy, Welch p of best vs it), best-ranked first

    @property
    def beats(self) -> list[str]:
        """Strategies the best one is significantly better than (Welch p < ALPHA)."""
        return [name for name, p in self.versus if p < ALPHA]

    @property
    def versus_text(self) -> str:
        """One line: whom the best beats and whom it cannot be told apart from ("" without t-tests)."""
        if not self.versus:
            return ""
        beaten = [f"{n} (p={p:.2g})" for n, p in self.versus if p < ALPHA]
        tied = [f"{n} (p={p:.2g})" for n, p in self.versus if p >= ALPHA]
        parts = [f"beats {', '.join(beaten)}"] if beaten else []
        parts += [f"not separable from {', '.join(tied)}"] if tied else []
        return f"{self.best} " + "; ".join(parts)


def compare(pair: str, setup: str, fid_by_strategy: dict[str, Stat]) -> Verdict:
    """Verdict for one (pair, setup) from each strategy's FID over seeds."""
    ranked = sorted(fid_by_strategy.items(), key=lambda kv: kv[1].mean)
    head = f"{pair} [{setup}]"
    if not ranked:
        return Verdict(pair, setup, None, None, None, None, None, None, None, None, None,
                       f"{head}: no successful cells, no verdict")
    best, best_stat = ranked[0]
    if len(ranked) == 1:
        return Verdict(pair, setup, best, None, best_stat, None, None, None, None, None, None,
                       f"{head}: only {best} has results (FID {best_stat.format()}), "
                       "nothing to compare")
    runner, runner_stat = ranked[1]
    lead = runner_stat.mean - best_stat.mean
    lead_pct = 100.0 * lead / runner_stat.mean if runner_stat.mean else None
    overlap = _spreads_overlap(best_stat, runner_stat)
    p_value = _welch_p(best_stat, runner_stat)

    if p_value is not None:
        significant = p_value < ALPHA
        judgement = (f"significant (Welch p={p_value:.3g})" if significant
                     else f"not significant (Welch p={p_value:.3g})")
        if significant and overlap:
            judgement += ", though the spreads overlap"
    elif overlap is None:
        significant = None
        judgement = (f"undetermined: need >= {MIN_SEEDS_FOR_TEST} seeds each "
                     "for a t-test and >= 2 for a spread")
    else:
        significant = not overlap
        judgement = ("spreads apart" if significant else "not significant: spreads overlap")
        judgement += f" (no t-test: need >= {MIN_SEEDS_FOR_TEST} seeds each)"
    pct = f", {lead_pct:.1f}%" if lead_pct is not None else ""
    text = (f"{head}: {best} best, FID {best_stat.format()} vs {runner} "
            f"{runner_stat.format()}: lead {lead:.2f}{pct}; {judgement}")
    versus = tuple((name, p) for name, stat in ranked[1:]
                   if (p := _welch_p(best_stat, stat)) is not None)
    return Verdict(pair, setup, best, runner, best_stat, runner_stat, lead, lead_pct, overlap,
                   p_value, significant, text, versus)


def _spreads_overlap(a: Stat, b: Stat) -> bool | None:
    if a.std is None or b.std is None:
        return None
    return (a.mean + a.std) >= (b.mean - b.std) and (b.mean + b.std) >= (a.mean - a.std)


def _welch_p(a: Stat, b: Stat) -> float | None:
    if a.n < MIN_SEEDS_FOR_TEST or b.n < MIN_SEEDS_FOR_TEST:
        return None
    if a.std == 0 and b.std == 0:  # identical seeds on both sides: the test is undefined
        return 0.0 if a.mean != b.mean else 1.0
    from scipy.stats import ttest_ind  # scipy is slow to import; only verdicts need it

    return float(ttest_ind(a.values, b.values, equal_var=False).pvalue)


def verdicts(records: Iterable[dict]) -> list[Verdict]:
    """One verdict per (pair, setup) over the run's ok cells, in the order the run met them.

    Setups are compared separately: a setup changes the process count and so the effective
    batch, and pooling them would mix two experiments into one spread.
    """
    records = list(records)
    stats = aggregate(records, metrics=[METRIC])
    out = []
    for pair in ordered_unique(r["pair"] for r in records):
        for setup in ordered_unique(r["setup"] for r in records if r["pair"] == pair):
            fids = {strategy: per[METRIC] for (p, strategy, s), per in stats.items()
                    if p == pair and s == setup and METRIC in per}
            out.append(compare(pair, setup, fids))
    return out
