"""zoo.stats against numbers computed independently of scipy: means and standard deviations by hand,
Student-t critical values from the textbook table (t_{0.975,2} = 4.302653, t_{0.975,4} = 2.776445),
and p-values from the closed-form t distribution with 2 degrees of freedom,
two-sided p = 1 - t / sqrt(2 + t^2). Each test names the wrong implementation it catches."""
import math

import pytest
import scipy.stats

from zoo.stats import aggregate, holm_adjust, paired, summarize, verdicts

T_975_DF2 = 4.302653  # textbook table
T_975_DF4 = 2.776445
Z_975 = 1.959964      # what a normal-approximation interval would use instead


def p_df2(t: float) -> float:
    """Two-sided p-value of Student's t with 2 degrees of freedom (its CDF is closed-form)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def run(point, seed, value=None, status="ok", best=None):
    row = {"point": point, "seed": seed, "status": status,
           "metrics": {} if value is None else {"val/loss": value}}
    if best is not None:
        row["best"] = {"val/loss": best}
    return row


# ------------------------------------------------------------------------------------ summarize

def test_summarize_three_values_by_hand():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (n-1) = 7/3, std = 1.527525;
    # sem = sqrt(7/3) / sqrt(3) = 0.881917; half-width 4.302653 * 0.881917 = 3.794583.
    # Catches ddof=0 (std 1.247219) and z instead of t (half-width 1.728 instead of 3.795).
    s = summarize([1.0, 2.0, 4.0])
    assert s["n"] == 3 and s["note"] is None and s["n_nonfinite"] == 0
    assert s["mean"] == pytest.approx(2.333333, abs=1e-6)
    assert s["std"] == pytest.approx(1.527525, abs=1e-6)
    assert s["ci_low"] == pytest.approx(-1.461250, abs=1e-5)
    assert s["ci_high"] == pytest.approx(6.127917, abs=1e-5)
    assert s["ci_high"] - s["ci_low"] != pytest.approx(2 * Z_975 * 0.881917, abs=1e-3)


def test_summarize_five_values_by_hand():
    # [1..5]: mean 3, sum of squared deviations 10, / 4 = 2.5, std 1.581139; sem = sqrt(2.5 / 5) =
    # 0.707107; half-width 2.776445 * 0.707107 = 1.963243. Catches ddof=0 (std 1.414214) and a z
    # interval (half-width 1.385904), and a fixed df (t for df=2 would give 3.042).
    s = summarize([3.0, 1.0, 5.0, 2.0, 4.0])
    assert (s["n"], s["mean"]) == (5, 3.0)
    assert s["std"] == pytest.approx(1.581139, abs=1e-6)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(1.036757, abs=1e-5), pytest.approx(4.963243, abs=1e-5))


def test_summarize_confidence_level_is_used():
    # 90%: t_{0.95,2} = 2.919986 (table) on [1, 2, 4]: half-width 2.919986 * 0.881917 = 2.575181.
    # Catches a hard-coded 95%.
    s = summarize([1.0, 2.0, 4.0], confidence=0.90)
    assert s["ci_high"] - s["mean"] == pytest.approx(2.575181, abs=1e-5)


def test_summarize_one_value_and_none():
    # n = 1: a mean but no spread; a naive std would be nan (ddof=1) or 0 (ddof=0), both wrong claims.
    s = summarize([0.7])
    assert (s["n"], s["mean"], s["std"], s["ci_low"], s["ci_high"]) == (1, 0.7, None, None, None)
    assert s["note"] == "n = 1: no spread or confidence interval"
    e = summarize([])
    assert (e["n"], e["mean"], e["std"]) == (0, None, None) and e["note"] == "no finite values"


def test_summarize_nonfinite_values_excluded_and_said():
    # A diverged run (nan or inf) is not averaged: mean of [1, 3] is 2, not nan (plain mean) and not
    # 4/3 (nan counted as 0 / dropped from the sum but kept in n).
    s = summarize([1.0, float("nan"), 3.0])
    assert (s["n"], s["mean"], s["n_nonfinite"]) == (2, 2.0, 1)
    assert s["std"] == pytest.approx(math.sqrt(2))  # deviations -1, +1: (1 + 1) / (2 - 1) = 2
    assert s["note"] == "1 of 3 values not finite (excluded)"
    s = summarize([float("inf"), 5.0, float("-inf")])
    assert (s["n"], s["mean"], s["std"]) == (1, 5.0, None)
    assert s["note"] == "2 of 3 values not finite (excluded); n = 1: no spread or confidence interval"


# ------------------------------------------------------------------------------------ aggregate

def test_aggregate_excludes_and_reports_failed_seeds():
    # Seed 2 of norm=batch failed after logging 100.0, seed 3 finished without the metric: both are
    # reported and neither is averaged. Mean of [0.3, 0.5] = 0.4; averaging the failed run would give
    # 33.6. Best values [0.2, 0.4] -> mean 0.3, steps [10, 30] -> 20.
    rows = [run("norm=batch", 0, 0.3, best=[0.2, 10]), run("norm=layer", 0, 0.6),
            run("norm=batch", 1, 0.5, best=[0.4, 30]), run("norm=batch", 2, 100.0, status="failed", best=[0.0, 5]),
            run("norm=batch", 3, None)]
    out = aggregate(rows, "val/loss")
    assert [a["point"] for a in out] == ["norm=batch", "norm=layer"]  # first-appearance order
    b = out[0]
    assert (b["metric"], b["n"], b["failed_seeds"], b["nonfinite_seeds"]) == ("val/loss", 2, [2, 3], [])
    assert b["mean"] == pytest.approx(0.4)
    assert b["std"] == pytest.approx(math.sqrt(0.02))  # deviations -0.1, +0.1: 0.02 / 1
    assert b["best"]["mean"] == pytest.approx(0.3) and b["best_step"]["mean"] == pytest.approx(20)
    layer = out[1]
    assert (layer["n"], layer["mean"], layer["best"], layer["best_step"]) == (1, 0.6, None, None)


def test_aggregate_nonfinite_run_named():
    # An ok run that diverged to nan: excluded from the mean, counted in the note, named by seed.
    rows = [run("p", 0, 1.0), run("p", 1, float("nan")), run("p", 2, 3.0)]
    (a,) = aggregate(rows, "val/loss")
    assert (a["n"], a["mean"], a["nonfinite_seeds"], a["failed_seeds"]) == (2, 2.0, [1], [])
    assert a["note"] == "1 of 3 values not finite (excluded)"


def test_duplicate_runs_are_an_error():
    # The same (point, seed) twice would be double-counted in a mean or paired arbitrarily.
    with pytest.raises(ValueError, match="two runs"):
        aggregate([run("p", 0, 1.0), run("p", 0, 2.0)], "val/loss")


# --------------------------------------------------------------------------------------- paired

def test_paired_hand_computed_against_df2_closed_form():
    # Differences point - baseline: [0.01, 0.02, 0.03]; mean 0.02, sd 0.01 (deviations -0.01, 0,
    # +0.01: 0.0002 / 2), t = 0.02 / (0.01 / sqrt 3) = sqrt 12 = 3.464102, two-sided p with df=2:
    # 1 - sqrt(12/14) = 0.074180. CI 0.02 +- 4.302653 * 0.01 / sqrt 3 = (-0.004841, 0.044841).
    # Catches an unpaired (Student or Welch) test: the baselines vary by seed (0.3 .. 0.8), so the
    # unpaired t is ~0.1 and p ~0.9. Catches a z-based p (2 * (1 - Phi(3.46)) = 0.0005).
    rows = [run("norm=batch", s, v) for s, v in enumerate([0.50, 0.80, 0.30])]
    rows += [run("norm=group", s, v) for s, v in enumerate([0.51, 0.82, 0.33])]
    (r,) = paired(rows, "val/loss", baseline="norm=batch")
    assert (r["point"], r["baseline"], r["metric"], r["n"], r["seeds"]) == ("norm=group", "norm=batch", "val/loss", 3, [0, 1, 2])
    assert r["mean_diff"] == pytest.approx(0.02, abs=1e-12)
    assert r["std_diff"] == pytest.approx(0.01, abs=1e-12)
    assert r["t"] == pytest.approx(3.464102, abs=1e-5)
    assert r["p_value"] == pytest.approx(0.074180, abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(-0.004841, abs=1e-6), pytest.approx(0.044841, abs=1e-6))
    assert r["significant"] is False and r["better"] is None and r["excluded_seeds"] == []
    assert r["verdict"] == ("norm=group vs norm=batch on val/loss: +0.02 (95% CI -0.00484 to 0.0448), "
                            "p = 0.074, n = 3: not significant at 0.05; few seeds: low power")
    # At alpha 0.1 the same numbers are significant, and higher loss is worse under mode "min",
    # better under mode "max" (an accuracy). Catches a reversed sign convention.
    (r,) = paired(rows, "val/loss", baseline="norm=batch", alpha=0.1)
    assert (r["significant"], r["better"]) == (True, "worse")
    assert r["verdict"].endswith("significant at 0.1, norm=group worse; few seeds: low power")
    (r,) = paired(rows, "val/loss", baseline="norm=batch", alpha=0.1, mode="max")
    assert r["better"] == "better"


@pytest.mark.parametrize("n,t_crit", [(3, T_975_DF2), (5, T_975_DF4)])
def test_paired_at_textbook_critical_value_gives_p_005(n, t_crit):
    # Differences c + [-1, 0, 1] (sd 1) or c + [-2, -1, 0, 1, 2] (sd sqrt 2.5) with c chosen so
    # t = c * sqrt(n) / sd is exactly the table's t_{0.975, n-1}: the two-sided p must be 0.05 and the
    # CI must touch 0. Catches a one-sided p (0.025), a z-based p (0.0009 / 0.0055) and a wrong df.
    offsets = [-1.0, 0.0, 1.0] if n == 3 else [-2.0, -1.0, 0.0, 1.0, 2.0]
    sd = 1.0 if n == 3 else math.sqrt(2.5)
    c = t_crit * sd / math.sqrt(n)
    base = [10.0 * (s + 1) for s in range(n)]
    rows = [run("b", s, v) for s, v in enumerate(base)]
    rows += [run("x", s, v + c + o) for s, (v, o) in enumerate(zip(base, offsets))]
    (r,) = paired(rows, "val/loss", baseline="b")
    assert r["t"] == pytest.approx(t_crit, abs=1e-5)
    assert r["p_value"] == pytest.approx(0.05, abs=1e-6)
    assert r["ci_low"] == pytest.approx(0.0, abs=1e-5)
    assert ("few seeds: low power" in r["verdict"]) == (n < 5)


def test_paired_significant_verdict_five_seeds():
    # Differences [-0.05, -0.04, -0.06, -0.05, -0.05]: mean -0.05, sd sqrt(0.0002 / 4) = 0.0070711,
    # t = -0.05 / (0.0070711 / sqrt 5) = -15.81; CI -0.05 +- 2.776445 * 0.0031623 = -0.05 +- 0.0087799.
    base = [0.30, 0.32, 0.28, 0.35, 0.31]
    rows = [run("norm=batch", s, v) for s, v in enumerate(base)]
    rows += [run("norm=rms", s, v) for s, v in enumerate([0.25, 0.28, 0.22, 0.30, 0.26])]
    (r,) = paired(rows, "val/loss", baseline="norm=batch")
    assert r["std_diff"] == pytest.approx(0.0070711, abs=1e-7)
    assert r["t"] == pytest.approx(-15.811388, abs=1e-4)
    assert r["ci_high"] == pytest.approx(-0.05 + 0.0087799, abs=1e-6)
    assert (r["significant"], r["better"]) == (True, "better")
    assert verdicts([r]) == ["norm=rms vs norm=batch on val/loss: -0.05 (95% CI -0.0588 to -0.0412), "
                             "p < 0.001, n = 5: significant at 0.05, norm=rms better"]


def test_paired_n1_no_test():
    # One common seed: a difference but no test; a naive ttest would return nan.
    rows = [run("b", 0, 1.0), run("x", 0, 1.25)]
    (r,) = paired(rows, "val/loss", baseline="b")
    assert (r["n"], r["mean_diff"], r["std_diff"], r["p_value"], r["significant"], r["better"]) == (1, 0.25, None, None, None, None)
    assert r["verdict"] == "x vs b on val/loss: +0.25 at seed 0, n = 1: too few seeds to test"


def test_paired_n0_no_common_seeds():
    # Different seeds on each side: nothing pairs; pairing by position instead of by seed would
    # compare seed 0 with seed 1 and report n = 2.
    rows = [run("b", 0, 1.0), run("b", 1, 2.0), run("x", 2, 1.0), run("x", 3, 2.0)]
    (r,) = paired(rows, "val/loss", baseline="b")
    assert (r["n"], r["seeds"], r["mean_diff"], r["p_value"], r["significant"]) == (0, [], None, None, None)
    assert r["excluded_seeds"] == [2, 3, 0, 1]
    assert "no seed where both runs finished" in r["verdict"]


def test_paired_failed_seed_on_either_side_excluded():
    # Baseline seed 1 failed (its 9.0 must not be used), point seed 3 is nan, seed 4 exists only for
    # the baseline. The remaining seeds 0, 2 have differences [0.1, 0.3]: mean 0.2, sd sqrt(0.02);
    # t = 0.2 / (sqrt(0.02) / sqrt 2) = 2, and with df=1 (Cauchy) p = 1 - (2/pi) atan 2 = 0.295167.
    # Using the failed run would give 3 seeds and a different mean.
    rows = [run("b", 0, 1.0), run("b", 1, 9.0, status="failed"), run("b", 2, 1.0), run("b", 3, 1.0), run("b", 4, 1.0),
            run("x", 0, 1.1), run("x", 1, 1.2), run("x", 2, 1.3), run("x", 3, float("nan"))]
    (r,) = paired(rows, "val/loss", baseline="b")
    assert (r["n"], r["seeds"], r["excluded_seeds"]) == (2, [0, 2], [1, 3, 4])
    assert r["mean_diff"] == pytest.approx(0.2)
    assert r["t"] == pytest.approx(2.0)
    assert r["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0), abs=1e-9)
    assert r["verdict"].endswith("excluded seeds 1, 3, 4: failed, missing or not finite on one side)")


def test_paired_tie_all_zero_differences():
    # Identical at every seed: 0/0 in the t statistic (scipy gives nan): no p-value is made up.
    rows = [run("b", s, v) for s, v in enumerate([0.3, 0.5, 0.4])] + [run("x", s, v) for s, v in enumerate([0.3, 0.5, 0.4])]
    (r,) = paired(rows, "val/loss", baseline="b")
    assert math.isnan(scipy.stats.ttest_rel([0.3, 0.5, 0.4], [0.3, 0.5, 0.4]).pvalue)
    assert (r["mean_diff"], r["std_diff"], r["t"], r["p_value"], r["significant"], r["better"]) == \
        (0.0, 0.0, None, None, None, None)
    assert r["verdict"] == ("x vs b on val/loss: identical at every seed (difference 0), n = 3: no variance, so a "
                            "t-test cannot be computed; few seeds: low power")


@pytest.mark.parametrize("base,point", [([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]),  # exact differences 0.5
                                        ([0.2, 0.3, 0.4], [0.3, 0.4, 0.5])])  # 0.1 up to float rounding
def test_paired_zero_variance_nonzero_differences(base, point):
    # The same non-zero difference at every seed: sd 0, t = +-inf; scipy returns p = 0 or nan (and
    # for the rounded case a huge t with p ~ 1e-15). Neither is reported: no p, significant None.
    rows = [run("b", s, v) for s, v in enumerate(base)] + [run("x", s, v) for s, v in enumerate(point)]
    (r,) = paired(rows, "val/loss", baseline="b")
    d = point[0] - base[0]
    assert r["mean_diff"] == pytest.approx(d) and r["std_diff"] == 0.0
    assert (r["t"], r["p_value"], r["significant"], r["better"], r["ci_low"], r["ci_high"]) == (None,) * 6
    assert r["verdict"] == (f"x vs b on val/loss: +{d:.3g} at every seed, n = 3: no variance, so a t-test cannot "
                            "be computed; few seeds: low power")


def test_paired_rejects_bad_arguments():
    # A misspelt baseline must not quietly compare nothing; an unknown mode must not default to "min".
    rows = [run("b", 0, 1.0), run("x", 0, 1.0)]
    with pytest.raises(ValueError, match="baseline"):
        paired(rows, "val/loss", baseline="nope")
    with pytest.raises(ValueError, match="mode"):
        paired(rows, "val/loss", baseline="b", mode="lower")


# ----------------------------------------------------------------------------------------- Holm

def test_holm_hand_computed():
    # p = [0.01, 0.04, 0.03], m = 3, sorted 0.01, 0.03, 0.04: 3 * 0.01 = 0.03, 2 * 0.03 = 0.06,
    # 1 * 0.04 = 0.04 -> raised to the running max 0.06. Catches Bonferroni (0.03, 0.12, 0.09), no
    # running max (0.04 for the last) and results returned in sorted instead of input order.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []


def test_paired_holm_over_three_points():
    # Differences c + [-1, 0, 1] (sd 1, df 2), t = c * sqrt 3: c = 2, 3, 5 give
    # t = 3.464102, 5.196152, 8.660254 and p (closed form, df 2) = 0.074180, 0.035099, 0.013072.
    # Per comparison at 0.05: "three" and "five" significant. Holm: 3 * 0.013072 = 0.039217,
    # 2 * 0.035099 = 0.070197, max(0.070197, 0.074180) = 0.074180: only "five" stays significant.
    base = [10.0, 20.0, 30.0]
    rows = [run("b", s, v) for s, v in enumerate(base)]
    for name, c in [("two", 2.0), ("three", 3.0), ("five", 5.0)]:
        rows += [run(name, s, v + c + o) for s, (v, o) in enumerate(zip(base, [-1.0, 0.0, 1.0]))]
    raw = paired(rows, "val/loss", baseline="b", mode="max")
    assert [r["p_value"] for r in raw] == pytest.approx([p_df2(3.464102), p_df2(5.196152), p_df2(8.660254)], abs=1e-6)
    assert [r["p_value"] for r in raw] == pytest.approx([0.074180, 0.035099, 0.013072], abs=1e-6)
    assert [r["significant"] for r in raw] == [False, True, True]
    assert all(r["p_holm"] is None for r in raw)
    adj = paired(rows, "val/loss", baseline="b", mode="max", holm=True)
    assert [r["p_holm"] for r in adj] == pytest.approx([0.074180, 0.070197, 0.039217], abs=1e-6)
    assert [r["significant"] for r in adj] == [False, False, True]
    assert [r["better"] for r in adj] == [None, None, "better"]
    assert "p = 0.013 (Holm-adjusted 0.039)" in adj[2]["verdict"]
