"""Statistics of a multi-seed comparison: per-point summaries and paired tests against a baseline.

Everything takes and returns plain Python data (floats, ints, str, None, lists, dicts), so the
results can go straight into a JSON report. Distributions come from scipy, not hand-written
formulas. The input is one row per run (one sweep point, one seed):

    {"point": "norm=batch", "seed": 0, "status": "ok" | "failed",
     "metrics": {"val/loss": 0.3, ...},              # final values
     "best": {"val/loss": [best_value, step], ...}}  # optional

A run counts only if its status is "ok" and it has the metric; anything else is a failed seed,
excluded and reported, never averaged. Non-finite values (a diverged run) are excluded and counted.
"""
from __future__ import annotations

import math
from typing import Sequence

from scipy import stats as _st

# Two differences this close (relative to the metric's size) are one value written twice: the
# subtraction x - b rounds at ~eps * |x|, so "the same difference at every seed" in the numbers can
# come back with a variance of 1e-34 instead of 0, and a t-test on it would claim p ~ 0.
_REL_TOL = 16 * 2.0 ** -52


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation (ddof=1) and Student-t confidence interval of the mean.

    -> {"n", "mean", "std", "ci_low", "ci_high", "n_nonfinite", "note"}. n counts finite values
    only; nan/inf values are excluded and counted in n_nonfinite and in note. std and the interval
    are None when n < 2 (mean is None when n = 0); note is None when there is nothing to say.
    """
    _check_level(confidence, "confidence")
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    n, notes = len(finite), []
    if n < len(values):
        notes.append(f"{len(values) - n} of {len(values)} values not finite (excluded)")
    out = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None,
           "n_nonfinite": len(values) - n}
    if n == 0:
        notes.append("no finite values")
    else:
        out["mean"] = mean = math.fsum(finite) / n
        if n == 1:
            notes.append("n = 1: no spread or confidence interval")
        else:
            out["std"] = std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
            half = float(_st.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
            out["ci_low"], out["ci_high"] = mean - half, mean + half
    out["note"] = "; ".join(notes) or None
    return out


def aggregate(rows: list[dict], metric: str, confidence: float = 0.95) -> list[dict]:
    """One summary per sweep point, in order of first appearance.

    -> [{"point", "metric", **summarize(final values), "best": summarize(best values) | None,
         "best_step": summarize(steps of the best values) | None, "failed_seeds": [...],
         "nonfinite_seeds": [...]}]
    failed_seeds: status not "ok" or the metric missing; their values are not used anywhere.
    nonfinite_seeds: ok runs whose final value is nan/inf (excluded by summarize, and named here).
    best/best_step are None when no usable run recorded a best value for the metric.
    """
    out = []
    for point, runs in _by_point(rows).items():
        ok = [r for r in runs if _final(r, metric) is not None]
        finals = [_final(r, metric) for r in ok]
        bests = [r["best"][metric] for r in ok if (r.get("best") or {}).get(metric) is not None]
        out.append({
            "point": point, "metric": metric, **summarize(finals, confidence),
            "best": summarize([b[0] for b in bests], confidence) if bests else None,
            "best_step": summarize([b[1] for b in bests], confidence) if bests else None,
            "failed_seeds": [r.get("seed") for r in runs if _final(r, metric) is None],
            "nonfinite_seeds": [r.get("seed") for r, v in zip(ok, finals) if not math.isfinite(v)],
        })
    return out


def paired(rows: list[dict], metric: str, baseline: str, mode: str = "min",
           confidence: float = 0.95, alpha: float = 0.05, holm: bool = False) -> list[dict]:
    """Each other point against `baseline`, seed by seed (runs with the same seed share data order).

    -> one dict per point other than baseline, in order of first appearance:
       {"point", "baseline", "metric", "n", "seeds", "excluded_seeds", "mean_diff", "std_diff",
        "ci_low", "ci_high", "t", "p_value", "p_holm", "significant", "better", "verdict"}
    Differences are point - baseline over `seeds`: the seeds where both runs are ok and finite;
    every other seed of either side is in excluded_seeds. p_value is the two-sided paired t-test
    (scipy.stats.ttest_rel). It is per comparison, NOT corrected for testing several points against
    one baseline; with holm=True, p_holm holds Holm-Bonferroni adjusted p-values over the
    comparisons that have a p-value, and `significant` uses them (p_holm is None otherwise).
    better: "better" / "worse" (the point against the baseline; mode "min": lower is better) when
    significant, else None.

    Edge cases (significant / p_value):
      n = 0: nothing in common -> None / None.     n = 1: too few seeds to test -> None / None.
      the same difference at every seed, 0 (a tie) or not: zero variance, the t-test is undefined
        (scipy gives nan or +-inf) -> None / None, said so in the verdict rather than made up.
      n = 2..4: the test is reported, and the verdict warns "few seeds: low power".
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    _check_level(confidence, "confidence")
    _check_level(alpha, "alpha")
    points = _by_point(rows)
    if baseline not in points:
        raise ValueError(f"baseline {baseline!r} is not among the points {list(points)}")
    base = _usable(points[baseline], metric)
    results = []
    for point, runs in points.items():
        if point == baseline:
            continue
        mine = _usable(runs, metric)
        seeds = [s for s in mine if s in base]
        everyone = list(dict.fromkeys([r.get("seed") for r in runs + points[baseline]]))
        x, b = [mine[s] for s in seeds], [base[s] for s in seeds]
        d = [xi - bi for xi, bi in zip(x, b)]
        s = summarize(d, confidence)
        res = {"point": point, "baseline": baseline, "metric": metric, "n": len(d), "seeds": seeds,
               "excluded_seeds": [e for e in everyone if e not in seeds],
               "mean_diff": s["mean"], "std_diff": s["std"], "ci_low": s["ci_low"],
               "ci_high": s["ci_high"], "t": None, "p_value": None, "p_holm": None,
               "significant": None, "better": None, "case": None}
        tol = _REL_TOL * max([abs(v) for v in x + b] + [0.0])
        if len(d) == 0:
            res["case"] = "none"
        elif len(d) == 1:
            res["case"] = "one"
        elif max(d) - min(d) <= tol:
            # t = mean / (0 / sqrt(n)): scipy gives +-inf or nan and p = 0 or nan; neither is a result.
            tie = all(abs(v) <= tol for v in d)
            res.update(case="tie" if tie else "constant", std_diff=0.0, ci_low=None, ci_high=None,
                       **({"mean_diff": 0.0} if tie else {}))
        else:
            test = _st.ttest_rel(x, b)
            res.update(case="test", t=float(test.statistic), p_value=float(test.pvalue))
        results.append(res)

    if holm:
        tested = [r for r in results if r["p_value"] is not None]
        for r, p in zip(tested, holm_adjust([r["p_value"] for r in tested])):
            r["p_holm"] = p
    for r in results:
        p = r["p_holm"] if holm else r["p_value"]
        if p is not None:
            r["significant"] = bool(p < alpha)
        if r["significant"]:
            lower = r["mean_diff"] < 0
            r["better"] = "better" if lower == (mode == "min") else "worse"
        r["verdict"] = _verdict(r, confidence, alpha, holm)
        del r["case"]
    return results


def verdicts(paired_results: list[dict]) -> list[str]:
    """The verdict sentences of `paired`'s results, in order."""
    return [r["verdict"] for r in paired_results]


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (reject where adjusted < alpha).

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of min(1, (m-j+1) p_(j));
    the running max keeps the step-down order (a smaller p never ends up with a larger adjusted p).
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------- helpers

def _check_level(x: float, name: str) -> None:
    if not 0 < x < 1:
        raise ValueError(f"{name} must be between 0 and 1, got {x}")


def _by_point(rows: list[dict]) -> dict[str, list[dict]]:
    """point -> its rows, points in order of first appearance. Two rows with the same point and seed
    would be counted twice (or paired arbitrarily), so they are an error, not a silent choice."""
    points, seen = {}, set()
    for r in rows:
        key = (r["point"], r.get("seed"))
        if key in seen:
            raise ValueError(f"two runs for point {key[0]!r} with seed {key[1]!r}")
        seen.add(key)
        points.setdefault(r["point"], []).append(r)
    return points


def _final(row: dict, metric: str) -> float | None:
    """The run's final value of metric, or None when the run failed or lacks the metric."""
    if row.get("status") != "ok":
        return None
    v = (row.get("metrics") or {}).get(metric)
    return None if v is None else float(v)


def _usable(runs: list[dict], metric: str) -> dict:
    """seed -> final value, for the runs that are ok and finite (the ones a pair can use)."""
    return {r.get("seed"): v for r in runs if (v := _final(r, metric)) is not None and math.isfinite(v)}


def _num(x: float, sign: bool = False) -> str:
    # 3 significant digits whatever the metric's scale (a loss of 0.012, a perplexity of 150).
    return format(x, "+.3g" if sign else ".3g")


def _verdict(r: dict, confidence: float, alpha: float, holm: bool) -> str:
    head, n, case = f"{r['point']} vs {r['baseline']} on {r['metric']}: ", r["n"], r["case"]
    if case == "none":
        text = head + "no seed where both runs finished with a finite value; nothing to compare"
    elif case == "one":
        text = head + f"{_num(r['mean_diff'], True)} at seed {r['seeds'][0]}, n = 1: too few seeds to test"
    elif case in ("tie", "constant"):
        same = "identical at every seed (difference 0)" if case == "tie" else f"{_num(r['mean_diff'], True)} at every seed"
        text = head + f"{same}, n = {n}: no variance, so a t-test cannot be computed"
    else:
        p = r["p_value"]
        ptxt = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
        if holm:
            ptxt += f" (Holm-adjusted {r['p_holm']:.2g})"
        text = (head + f"{_num(r['mean_diff'], True)} ({confidence * 100:g}% CI {_num(r['ci_low'])} "
                f"to {_num(r['ci_high'])}), {ptxt}, n = {n}: ")
        text += f"significant at {alpha:g}, {r['point']} {r['better']}" if r["significant"] \
            else f"not significant at {alpha:g}"
    if 1 < n < 5:
        text += "; few seeds: low power"
    if r["excluded_seeds"]:
        listed = ", ".join(str(s) for s in r["excluded_seeds"])
        text += f" (excluded seeds {listed}: failed, missing or not finite on one side)"
    return text
