"""The comparison dashboard (zoo/dashboard.py): escaping in Python, and the page itself in headless
Chromium, offline from file://, with every non-file request blocked."""
import json
import math
import re
from pathlib import Path
from statistics import fmean
from urllib.parse import unquote, urlparse

import pytest

from zoo.dashboard import write_dashboard

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download cannot work here
POINTS = ["norm=batch", "norm=group", "norm=none"]
STEPS = [0, 10, 20, 30, 40]
EVIL = "<b>boom</b> </script><script>window.pwned=1</script>"


def val_loss(p: int, seed: int, step: int) -> float:
    return 1.0 + 0.5 * p + 0.1 * seed - 0.01 * step


def synthetic_data() -> dict:
    """3 points x 3 seeds: norm=group seed 2 failed (partial curves), norm=none seed 2 pending, and
    norm=batch seed 1 logged one extra step (5) that the other seeds lack."""
    runs = []
    for p, point in enumerate(POINTS):
        for seed in range(3):
            name = f"{point},seed={seed}"
            status = "failed" if (p, seed) == (1, 2) else "pending" if (p, seed) == (2, 2) else "ok"
            steps = STEPS[:3] if status == "failed" else STEPS
            steps = sorted(steps + [5]) if (p, seed) == (0, 1) else steps
            curves = {} if status == "pending" else {
                "val/loss": [[s, val_loss(p, seed, s)] for s in steps],
                "val/acc": [[s, 0.5 + 0.01 * s + 0.02 * p] for s in steps],
                "train/loss": [[s, 2.0 / (1 + s) + 0.1 * seed] for s in steps],
            }
            d = f"runs/{name}"
            links = {} if status == "pending" else {
                "config": f"{d}/config.yaml", "command": f"{d}/command.txt", "log": f"{d}/run.log",
                **({"checkpoint": f"{d}/checkpoints/last.ckpt"} if status == "ok" else {}),
                "samples": [f"samples/{name}__val_pred.png"] if status == "ok" else []}
            runs.append({
                "name": name, "point": point, "seed": seed, "status": status,
                "error": EVIL if status == "failed" else None, "retries": 1 if status == "failed" else 0,
                "values": {"model.norm": point.split("=")[1]},
                "metrics": {"val/loss": val_loss(p, seed, 40), "val/acc": 0.9, "train/loss": 0.1} if status == "ok" else {},
                "val_step": 40 if status == "ok" else None,
                "curves": curves, "links": links,
                "stats": {"train samples/s": 100.0 + p, "peak memory (MB)": 50.5, "params": 7400, "wall time (s)": None},
            })
    cols = ["point", "metric", "n", "mean", "std", "95% CI", "best mean", "best step (mean)", "failed seeds"]
    # means 9 / 10 / null / 0.5: numeric order differs from text order ("10" < "9"), null goes last
    rows = [["norm=batch", "val/loss", 3, 9.0, 0.1, "[8.8, 9.2]", 8.9, 40, ""],
            ["norm=group", "val/loss", 2, 10.0, 0.1, "[9.1, 10.9]", 9.9, 40, "2"],
            ["norm=none", "val/loss", 0, None, None, None, None, None, ""],
            ["norm=batch", "val/acc", 3, 0.5, 0.01, "[0.48, 0.52]", 0.51, 30, ""]]
    return {
        "title": "Comparison: configs/unet.yaml", "description": "Sweep: model.norm ∈ {batch, group, none}; seeds 0, 1, 2.",
        "done": 8, "total": 9, "metric": "val/loss", "mode": "min", "points": POINTS, "runs": runs,
        "aggregate": {"columns": cols, "rows": rows},
        "paired": {"columns": ["point", "baseline", "metric", "n", "mean diff", "95% CI", "p", "verdict"],
                   "rows": [["norm=group", "norm=batch", "val/loss", 2, 0.5, "[0.4, 0.6]", 0.01, "worse"]]},
        "verdicts": ["norm=group vs norm=batch on val/loss: worse by 0.5, significant at 0.05"],
    }


def test_text_is_escaped_and_json_round_trips(tmp_path):
    data = synthetic_data()
    data["title"] = "a <b>title</b> </script>"
    data["runs"][0]["name"] = "</script><b>x</b><!--"
    data["runs"][0]["metrics"]["val/loss"] = math.nan  # JSON has no NaN: it becomes null
    page = write_dashboard(data, tmp_path)
    assert page == tmp_path / "report.html"
    text = page.read_text()
    assert "<b>" not in text and "<!--" not in text
    assert text.count("</script") == 3  # plotly.min.js, the data, the code: nothing from the data
    assert "&lt;b&gt;title&lt;/b&gt;" in text  # <title> and <h1>
    embedded = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    back = json.loads(embedded)
    assert back["runs"][0]["name"] == "</script><b>x</b><!--" and back["runs"][1]["error"] is None
    assert back["runs"][0]["metrics"]["val/loss"] is None and back["title"] == data["title"]
    # plotly.js sits beside the page, referenced relatively; nothing from a CDN; no temp files left
    assert re.search(r"""(src|href)=["']?(https?:)?//""", text) is None
    assert '<script src="plotly.min.js">' in text and (tmp_path / "plotly.min.js").stat().st_size > 1e6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotly.min.js", "report.html"]


# ---- the page in a real browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The synthetic comparison written to disk, every linked file present, and one browser."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    out = tmp_path_factory.mktemp("compare")
    data = synthetic_data()
    for run in data["runs"]:
        for rel in [v for k, v in run["links"].items() if k != "samples"] + run["links"].get("samples", []):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text("x")
    url = write_dashboard(data, out).as_uri()
    pw = sync_api.sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield {"browser": browser, "url": url, "data": data, "out": out}
    browser.close()
    pw.stop()


def open_page(site):
    """The dashboard loaded in a new tab, plus the lists of its errors and of its non-file requests
    (all blocked)."""
    page = site["browser"].new_page(viewport={"width": 1400, "height": 900})
    errors, remote = [], []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))

    def block(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            remote.append(route.request.url)
            route.abort()

    page.route("**/*", block)
    page.goto(site["url"])
    page.wait_for_selector("body[data-ready]", timeout=20_000)
    return page, errors, remote


@pytest.fixture(scope="module")
def loaded(site):
    """One load shared by the tests that only read the page (loading plotly.js takes ~2 s here)."""
    page, errors, remote = open_page(site)
    yield page, errors, remote
    page.close()


@pytest.fixture
def shared(loaded):
    yield loaded[0]
    assert loaded[1] == [] and loaded[2] == [], "console errors or network requests"


@pytest.fixture
def page(site):
    """A page of its own, for the tests that change its state (checkboxes, slider, legend, sorting)."""
    page, errors, remote = open_page(site)
    yield page
    page.close()
    assert errors == [] and remote == [], "console errors or network requests"


def charts(page) -> dict:
    """{metric: [trace summary]} read from the plot divs' `.data`."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.chart')].map(d =>
        [d.dataset.metric, d.data.map(t => ({meta: t.meta, visible: t.visible, x: t.x, y: t.y}))]))""")


def mean_of(page, metric: str, point: str) -> dict:
    [t] = [t for t in charts(page)[metric] if t["meta"]["kind"] == "mean" and t["meta"]["point"] == point]
    return dict(zip(t["x"], t["y"]))


def redraw(page, action) -> None:
    """Runs `action` (a UI change) and waits until the charts were drawn again."""
    n = int(page.evaluate("document.body.dataset.draws"))
    action()
    page.wait_for_function(f"+document.body.dataset.draws > {n}")


def test_header_text_and_sections(shared, site):
    assert "8 of 9 runs done" in shared.inner_text("#progress")
    assert shared.inner_text("h1") == site["data"]["title"]
    assert "significant at 0.05" in shared.inner_text("#verdicts")
    assert shared.locator("#paired tbody tr").count() == 1


def test_one_mean_trace_per_point_in_every_chart(shared):
    got = charts(shared)
    assert list(got) == ["train/loss", "val/acc", "val/loss"]  # one chart per metric, train/* first
    for metric, traces in got.items():
        assert [t["meta"]["point"] for t in traces if t["meta"]["kind"] == "mean"] == POINTS, metric
        assert [t["meta"]["point"] for t in traces if t["meta"]["kind"] == "band"] == POINTS, metric
        assert len([t for t in traces if t["meta"]["kind"] == "seed"]) == 8, metric  # the pending run has no curves
    buttons = shared.evaluate("[...document.querySelectorAll('.chart .modebar-btn')].map(b => b.dataset.title)")
    assert buttons and not any("share" in b.lower() for b in buttons)  # no upload to Plotly's cloud


def test_mean_is_the_mean_of_finished_seeds_on_common_steps(shared):
    batch = mean_of(shared, "val/loss", "norm=batch")
    assert list(batch) == STEPS  # seed 1's extra step 5 is not common to all seeds
    assert batch[20] == pytest.approx(fmean(val_loss(0, s, 20) for s in range(3))) == pytest.approx(0.9)
    group = mean_of(shared, "val/loss", "norm=group")  # the failed seed 2 (steps 0..20) is left out
    assert list(group) == STEPS and group[40] == pytest.approx(fmean(val_loss(1, s, 40) for s in (0, 1)))
    none = mean_of(shared, "val/loss", "norm=none")  # the pending seed has no curve
    assert none[10] == pytest.approx(fmean(val_loss(2, s, 10) for s in (0, 1)))
    # min-max band: upper edge then lower edge reversed
    [band] = [t for t in charts(shared)["val/loss"] if t["meta"] == {"kind": "band", "point": "norm=batch"}]
    assert band["y"][STEPS.index(20)] == pytest.approx(val_loss(0, 2, 20))
    assert band["y"][-1 - STEPS.index(20)] == pytest.approx(val_loss(0, 0, 20))


def test_seed_lines_toggle_with_the_checkbox(page):
    def seeds():
        return [t for t in charts(page)["val/loss"] if t["meta"]["kind"] == "seed"]

    assert {t["visible"] for t in seeds()} == {False}
    redraw(page, lambda: page.check("#seeds"))
    assert {t["visible"] for t in seeds()} == {True}
    assert {(t["meta"]["point"], t["meta"]["seed"]) for t in seeds()} >= {("norm=group", 2)}  # failed seed shown
    redraw(page, lambda: page.uncheck("#seeds"))
    assert {t["visible"] for t in seeds()} == {False}


def test_smoothing_and_log_scale(page):
    def ema(ys, w):  # TensorBoard's debiased EMA
        last, out = 0.0, []
        for n, y in enumerate(ys, 1):
            last = last * w + (1 - w) * y
            out.append(last / (1 - w ** n))
        return out

    redraw(page, lambda: page.eval_on_selector(
        "#smoothing", "e => { e.value = '0.6'; e.dispatchEvent(new Event('input')); }"))
    assert page.inner_text("#smoothing-value") == "0.60"
    smoothed = [ema([val_loss(1, s, x) for x in STEPS], 0.6) for s in (0, 1)]
    got = mean_of(page, "val/loss", "norm=group")
    assert [got[x] for x in STEPS] == pytest.approx([fmean(v) for v in zip(*smoothed)])
    redraw(page, lambda: page.check("#logy"))
    assert page.evaluate("document.querySelector('.chart').layout.yaxis.type") == "log"


def test_legend_click_hides_a_points_mean_and_band_together(page):
    page.locator(".chart").first.locator(".legend .traces .legendtoggle").first.click()
    page.wait_for_function("document.querySelector('.chart').data.some(t => t.visible === 'legendonly')")
    hidden = {t["meta"]["kind"] for t in charts(page)["train/loss"]
              if t["visible"] == "legendonly" and t["meta"]["point"] == "norm=batch"}
    assert {"mean", "band"} <= hidden
    redraw(page, lambda: page.check("#seeds"))  # a redraw keeps the point hidden
    for t in charts(page)["train/loss"]:
        assert (t["visible"] == "legendonly") == (t["meta"]["point"] == "norm=batch"), t["meta"]


def test_aggregate_table_sorts_numerically_with_nulls_last(page):
    header = page.locator("#aggregate th", has_text=re.compile(r"^mean$"))

    def means():
        return page.locator("#aggregate tbody tr td:nth-child(4)").all_inner_texts()

    assert means() == ["9", "10", "—", "0.5"]  # as given
    header.click()
    assert means() == ["0.5", "9", "10", "—"] and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert means() == ["10", "9", "0.5", "—"] and header.get_attribute("aria-sort") == "descending"


def test_runs_table_status_errors_and_links(shared, site):
    rows = shared.locator("#runs tbody tr")
    assert rows.count() == 9
    header = shared.locator("#runs th").all_inner_texts()  # every val/ metric, the monitored first, as report.md
    assert header[:10] == ["run", "point", "seed", "status", "retries", "error", "val/loss", "val/acc", "val step",
                           "train samples/s"]
    assert rows.nth(0).locator("td").nth(7).inner_text() == "0.9" and rows.nth(0).locator("td").nth(8).inner_text() == "40"
    for i, run in enumerate(site["data"]["runs"]):
        row = rows.nth(i)
        assert row.locator("td").first.inner_text() == run["name"]
        assert row.locator("td").nth(3).inner_text() == run["status"]
        assert all(":" not in h and not h.startswith("/")  # relative
                   for h in row.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))"))
        hrefs = row.locator("a").evaluate_all("as => as.map(a => a.href)")
        expected = [v for k, v in run["links"].items() if k != "samples"] + run["links"].get("samples", [])
        assert len(hrefs) == len(expected)
        for href, rel in zip(hrefs, expected):  # relative links that resolve to the run's files
            assert Path(unquote(urlparse(href).path)) == site["out"] / rel
    failed = rows.nth(5)
    assert failed.locator("td.error").inner_text() == EVIL and failed.locator("td").nth(4).inner_text() == "1"
    assert shared.evaluate("document.querySelectorAll('#runs b, #runs script').length === 0 && !window.pwned")




def test_numbers_read_as_in_report_md(site, tmp_path):
    """report.md (zoo.compare._fmt) and the page (the browser's toFixed / toPrecision) show the same
    digits, exact binary ties included (0.15625 is one: Python's own format gives 0.1562)."""
    from zoo.compare import _fmt

    values = [0.15625, -0.15625, 1234.25, -1234.25, 1234.0, 12345678, 0.5, 999.96, 123.45, 1.5e-7, -1.23456e-8,
              1.234e-6, 0.000123456, 2 / 3, None]
    data = synthetic_data()
    im = data["aggregate"]["columns"].index("mean")
    template = data["aggregate"]["rows"][0]
    data["aggregate"]["rows"] = [[v if i == im else c for i, c in enumerate(template)] for v in values]
    page = site["browser"].new_page()
    page.goto(write_dashboard(data, tmp_path).as_uri())
    page.wait_for_selector("body[data-ready]", timeout=20_000)
    shown = page.locator(f"#aggregate tbody tr td:nth-child({im + 1})").all_inner_texts()
    page.close()
    assert shown == [_fmt(v) for v in values]
    assert shown[:5] == ["0.1563", "-0.1563", "1234.3", "-1234.3", "1,234"]  # by hand

def test_a_short_run_has_a_tick_at_every_step_and_none_between(site, tmp_path):
    data = synthetic_data()
    for run in data["runs"]:  # steps 2, 3, 4
        run["curves"] = {m: [[2 + i, v] for i, (_, v) in enumerate(c[:3])] for m, c in run["curves"].items()}
    page = site["browser"].new_page()
    page.goto(write_dashboard(data, tmp_path).as_uri())
    page.wait_for_function("+document.body.dataset.draws > 0", timeout=20_000)
    ticks = page.evaluate("[...document.querySelector('.chart').querySelectorAll('.xtick text')].map(t => t.textContent)")
    page.close()
    assert ticks == ["2", "3", "4"]


def test_a_curve_of_one_point_is_drawn_and_a_run_without_seeds_is_named_so(site, tmp_path):
    """One validation per run: a line of one point draws nothing, so each point gets a marker."""
    data = synthetic_data()
    for run in data["runs"]:
        run["curves"] = {m: c[:1] for m, c in run["curves"].items()}
        run["seed"] = None
    page = site["browser"].new_page()
    page.goto(write_dashboard(data, tmp_path).as_uri())
    page.wait_for_function("+document.body.dataset.draws > 0", timeout=20_000)
    chart = page.query_selector(".chart")
    points = chart.evaluate("c => c.querySelectorAll('.scatterlayer .point').length")
    names = chart.evaluate("c => c.data.filter(t => t.meta.kind === 'seed').map(t => t.name)")
    page.close()
    assert points > 0 and names and all(n.endswith("(the config's seed)") for n in names)
