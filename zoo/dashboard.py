"""The comparison's interactive dashboard: `report.html`, which works from file:// with no server and
no network.

Python only shapes the data and embeds it as JSON; a short hand-written script (below) draws it with
plotly.js, which is read from the installed `plotly` package and written beside the page as
`plotly.min.js` (no CDN). Every text from the data reaches the page through JSON and the DOM's text
APIs, never as markup, because run names and errors come from files.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from zoo.files import atomic_open, atomic_write_text

PLOTLY_JS = "plotly.min.js"


def write_dashboard(data: dict, out_dir: Path) -> Path:
    """Writes `out_dir/report.html` (and `plotly.min.js` beside it) atomically; returns the page's path.

    `data` is JSON-able; any number may be None (non-finite floats become null):
      title, description: str
      done, total: int                runs finished (ok or failed) / runs planned
      metric: str, mode: "min"|"max"  the monitored metric and its direction
      points: [str]                   sweep points in legend order
      runs: [{name, point, seed, status: "ok"|"failed"|"running"|"pending", error: str|None,
              retries: int, values: {key: value}, metrics: {name: number},
              curves: {name: [[step, value], ...]}, stats: {name: number},
              links: {"config"|"command"|"log"|"checkpoint": relative path, "samples": [relative path]}}]
      aggregate, paired: {columns: [str], rows: [[cell, ...]]}   rendered as given, sortable
      verdicts: [str]
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_plotly(out_dir)  # first, so the page never refers to a missing script
    page = out_dir / "report.html"
    # Atomic: the orchestrator rewrites the page after every finished run while people may be viewing it.
    atomic_write_text(page, _page(data))
    return page


def _write_plotly(out_dir: Path) -> None:
    from plotly.offline import get_plotlyjs  # lazy: only the dashboard needs plotly

    js = get_plotlyjs().encode("utf-8")
    path = out_dir / PLOTLY_JS
    # ~5 MB: rewritten only when missing or from another plotly version, not after every run.
    if not path.is_file() or path.read_bytes() != js:
        with atomic_open(path, "wb") as f:
            f.write(js)


def _finite(x):
    """`x` with non-finite floats as None (JSON has no NaN) and numpy/torch scalars as Python ones."""
    if hasattr(x, "item") and not isinstance(x, (dict, list, tuple, str)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_for_script(data: dict) -> str:
    text = json.dumps(_finite(data), allow_nan=False, ensure_ascii=False, default=str)
    # '<' only occurs inside JSON strings, where \u003c means the same; this rules out `</script>` and
    # `<!--` ending or changing the script element early. '>' and '&' for good measure.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(data: dict) -> str:
    e = html.escape
    done, total = data.get("done", 0), data.get("total", 0)
    failed = sum(r.get("status") == "failed" for r in data.get("runs", []))
    direction = "lower" if data.get("mode", "min") == "min" else "higher"
    progress = f"<strong>{e(str(done))} of {e(str(total))} runs done</strong>"
    if failed:
        progress += f" · {failed} failed"
    if data.get("metric"):
        progress += f" · monitored: {e(str(data['metric']))} ({direction} is better)"
    progress += f" · updated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if done != total:
        progress += " · reload for newer results"
    title = e(str(data.get("title", "Comparison")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{_CSS}</style>
<script src="{PLOTLY_JS}"></script>
</head><body>
<h1>{title}</h1>
<p class="desc">{e(str(data.get("description", "")))}</p>
<p id="progress">{progress}</p>
<noscript>The charts and tables need JavaScript.</noscript>
<section><h2>Curves</h2>
<div id="controls">
<label>smoothing <input id="smoothing" type="range" min="0" max="0.99" step="0.01" value="0">
<output id="smoothing-value">0.00</output></label>
<label><input id="seeds" type="checkbox"> individual seeds</label>
<label><input id="logy" type="checkbox"> log y</label>
<label>band <select id="band"><option value="minmax">min–max</option><option value="std">±1 std</option></select></label>
</div>
<div id="charts"></div></section>
<section><h2>Aggregate over seeds</h2><p class="note">Shaded: the best mean of the monitored metric, which is
not a test; the paired differences below say which differences are real.</p><div id="aggregate"></div></section>
<section><h2>Paired differences</h2><p class="note">Seed by seed, against the baseline. A row "P − B vs P0 − B0"
tests whether the difference depends on the other swept keys (the difference at P minus the one at P0).</p><div id="paired"></div><ul id="verdicts"></ul></section>
<section><h2>Runs</h2><div id="runs"></div></section>
<script type="application/json" id="data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .5em; }
.desc, .note { color: #555; margin: 0 0 .3em; } #progress { margin: 0; }
#controls { display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; margin-bottom: .5em; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: .5em; }
.chart { border: 1px solid #ddd; min-height: 380px; }
table { border-collapse: collapse; margin-bottom: .5em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .null { color: #aaa; }
tr.best td { background: #eef8ee; }
.status-ok { color: #18794e; } .status-failed { color: #c62828; font-weight: bold; }
.status-running { color: #b26a00; } .status-pending { color: #888; }
td.error { min-width: 16em; max-width: 40em; color: #c62828; white-space: pre-wrap; overflow-wrap: anywhere; }
td.links a { margin-right: .5em; }
"""

# Hand-written, no framework. Data text goes in via append()/textContent only (never innerHTML), and
# text handed to Plotly (which reads a little HTML in names and titles) is escaped first.
_JS = r"""
(() => {
'use strict';
const D = JSON.parse(document.getElementById('data').textContent);
const runs = D.runs || [];
const points = [...new Set([...(D.points || []), ...runs.map(r => r.point)])];
const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const color = p => PALETTE[points.indexOf(p) % PALETTE.length];
const rgba = (hex, a) => `rgba(${[1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16)).join(',')},${a})`;
const plotlyText = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...kids.filter(k => k != null));
  return e;
}
// as report.md's (zoo.compare._fmt)
const fmt = v => v == null ? '—' : typeof v !== 'number' ? String(v) : Number.isInteger(v) ? v.toLocaleString('en-US')
  : Math.abs(v) >= 1000 ? v.toFixed(1) : String(+v.toPrecision(4));

// TensorBoard's debiased EMA: starts at 0 and divides by 1 - w^n so early values are not pulled to 0.
function ema(ys, w) {
  let last = 0, n = 0;
  return ys.map(y => {
    if (y == null) return y;
    n++;
    last = last * w + (1 - w) * y;
    return last / (1 - Math.pow(w, n));
  });
}

// ---- curves: one chart per metric, train/* first, then val/*, then the rest
const rank = m => m.startsWith('train/') ? 0 : m.startsWith('val/') ? 1 : 2;
const metrics = [...new Set(runs.flatMap(r => Object.keys(r.curves || {})))]
  .sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));

function traces(m, opt, hidden) {
  const bands = [], seeds = [], means = [];
  for (const p of points) {
    const series = runs.filter(r => r.point === p && (r.curves?.[m] || []).length).map(r => {
      const c = r.curves[m], ys = ema(c.map(q => q[1]), opt.smoothing);  // each seed smoothed alone
      return {run: r, xs: c.map(q => q[0]), ys, at: new Map(c.map((q, i) => [q[0], ys[i]]))};
    });
    if (!series.length) continue;
    // Finished seeds only: a failed or running seed would cut the mean short. A point with none
    // finished still gets a (marked) mean of what there is.
    const ok = series.filter(s => s.run.status === 'ok'), use = ok.length ? ok : series;
    const steps = [...use[0].at.keys()].filter(x => use.every(s => s.at.has(x))).sort((a, b) => a - b);
    const mean = [], lo = [], hi = [];
    for (const x of steps) {
      const v = use.map(s => s.at.get(x));
      if (v.some(y => y == null)) { mean.push(null); lo.push(null); hi.push(null); continue; }
      const mu = v.reduce((a, b) => a + b, 0) / v.length;
      mean.push(mu);
      if (opt.band === 'std') {
        const sd = v.length > 1 ? Math.sqrt(v.reduce((a, y) => a + (y - mu) ** 2, 0) / (v.length - 1)) : 0;
        lo.push(mu - sd); hi.push(mu + sd);
      } else { lo.push(Math.min(...v)); hi.push(Math.max(...v)); }
    }
    const c = color(p), vis = hidden.has(p) ? 'legendonly' : true, name = plotlyText(p);
    // legendgroup = point: clicking the point's legend entry hides its mean, band and seeds together.
    bands.push({x: [...steps, ...[...steps].reverse()], y: [...hi, ...[...lo].reverse()], fill: 'toself',
      fillcolor: rgba(c, 0.18), line: {width: 0}, hoverinfo: 'skip', legendgroup: p, showlegend: false,
      visible: vis, name: name + ' band', meta: {kind: 'band', point: p}});
    for (const s of series) {  // failed/running seeds too, dotted
      const seed = s.run.seed == null ? "(the config's seed)" : `seed ${plotlyText(s.run.seed)}`;
      seeds.push({x: s.xs, y: s.ys, name: `${name} ${seed}`, legendgroup: p,
        showlegend: false, visible: opt.seeds ? vis : false, opacity: 0.5, hovertemplate: '%{y:.4g}',
        line: {color: c, width: 1, dash: s.run.status === 'ok' ? 'solid' : 'dot'},
        meta: {kind: 'seed', point: p, seed: s.run.seed, run: s.run.name}});
    }
    means.push({x: steps, y: mean, legendgroup: p, visible: vis, line: {color: c, width: 2.5},
      name: `${name} (${ok.length ? 'n=' + ok.length : 'unfinished'})`, hovertemplate: '%{y:.4g}',
      meta: {kind: 'mean', point: p, n: use.length}});
  }
  // drawn in this order: bands under seeds under means; the legend lists the means in point order
  // markers where there are few points: a curve of one validation has no line to draw
  return [...bands, ...seeds, ...means].map(t => ({type: 'scatter', marker: {size: 6},
    mode: t.meta.kind !== 'band' && t.x.length < 20 ? 'lines+markers' : 'lines', ...t}));
}

function layout(m, opt, steps) {
  const band = opt.band === 'std' ? '±1 std' : 'min–max';
  const sub = `line: mean over seeds · band: ${band} over seeds` + (opt.smoothing ? ` · EMA ${opt.smoothing}` : '');
  // steps are whole numbers: over a short run Plotly's own ticks would fall between them (2.5)
  const span = steps.reduce((a, x) => Math.max(a, x), -Infinity) - steps.reduce((a, x) => Math.min(a, x), Infinity);
  return {title: {text: plotlyText(m), subtitle: {text: sub}}, height: 380,
    margin: {l: 60, r: 15, t: 60, b: 80}, hovermode: 'x unified',
    xaxis: {title: {text: 'step'}, ...(span < 10 ? {dtick: 1} : {})}, yaxis: {type: opt.log ? 'log' : 'linear'},
    legend: {orientation: 'h', y: -0.22, yanchor: 'top'}, uirevision: m + opt.log};  // keep zoom unless the scale changes
}

const $ = id => document.getElementById(id);
const chartsEl = $('charts'), charts = metrics.map(m => chartsEl.appendChild(el('div', {class: 'chart', 'data-metric': m})));
let draws = 0, pending = false;
function draw() {
  const opt = {smoothing: +$('smoothing').value, seeds: $('seeds').checked, log: $('logy').checked, band: $('band').value};
  $('smoothing-value').textContent = opt.smoothing.toFixed(2);
  return Promise.all(charts.map(div => {
    // legend clicks hide a point in one chart; carry that over the redraw
    const hidden = new Set((div.data || []).filter(t => t.meta?.kind === 'mean' && t.visible === 'legendonly').map(t => t.meta.point));
    const data = traces(div.dataset.metric, opt, hidden);
    return Plotly.react(div, data, layout(div.dataset.metric, opt, data.flatMap(t => t.x)),
      {responsive: true, displaylogo: false, showSendToCloud: false});  // offline: no "Share" upload button
  })).then(() => { document.body.dataset.draws = ++draws; });
}
const redraw = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } };
if (!window.Plotly) chartsEl.append('plotly.min.js is missing beside this page, so no charts; the tables below still work.');
else if (!metrics.length) chartsEl.append('No curves yet.');
for (const id of ['smoothing', 'seeds', 'logy', 'band']) $(id).addEventListener(id === 'smoothing' ? 'input' : 'change', redraw);

// ---- tables: cells are values or nodes; click a header to sort (numbers numerically, empty last)
function table(columns, rows, rowClass = () => '') {
  const key = c => c instanceof Node ? (c.dataset.sort ?? c.textContent) : c;
  const items = rows.map(cells => ({cells, tr: el('tr', {class: rowClass(cells)}, ...cells.map(c => {
    if (c instanceof Node) return c;
    return el('td', {class: typeof c === 'number' ? 'num' : c == null ? 'null' : '', title: c == null ? '' : String(c)}, fmt(c));
  }))}));
  const tbody = el('tbody', {}, ...items.map(i => i.tr));
  let col = -1, asc = true;
  const ths = columns.map((name, i) => {
    const th = el('th', {scope: 'col', title: 'click to sort'}, String(name));
    th.addEventListener('click', () => {
      asc = col === i ? !asc : true; col = i;
      ths.forEach(h => h.removeAttribute('aria-sort'));
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      items.sort((r, s) => {
        const a = key(r.cells[i]), b = key(s.cells[i]);
        const ea = a == null || a === '', eb = b == null || b === '';
        if (ea || eb) return ea - eb;  // empty last in both directions
        const d = typeof a === 'number' && typeof b === 'number' ? a - b
          : typeof a === 'number' ? -1 : typeof b === 'number' ? 1
          : String(a).localeCompare(String(b), undefined, {numeric: true});
        return asc ? d : -d;
      });
      tbody.append(...items.map(r => r.tr));
    });
    return th;
  });
  return el('table', {}, el('thead', {}, el('tr', {}, ...ths)), tbody);
}

const agg = D.aggregate || {columns: [], rows: []}, ic = agg.columns.indexOf('metric'), im = agg.columns.indexOf('mean');
// highlight the best mean of the monitored metric
const cands = ic < 0 || im < 0 ? [] : agg.rows.filter(r => r[ic] === D.metric && typeof r[im] === 'number').map(r => r[im]);
const best = cands.length ? (D.mode === 'max' ? Math.max : Math.min)(...cands) : null;
$('aggregate').append(agg.rows.length ? table(agg.columns, agg.rows,
  r => best != null && r[ic] === D.metric && r[im] === best ? 'best' : '') : 'No finished runs yet.');
const paired = D.paired || {columns: [], rows: []};
$('paired').append(paired.rows.length ? table(paired.columns, paired.rows) : 'No paired comparisons (they need two points with common seeds).');
$('verdicts').append(...(D.verdicts || []).map(v => el('li', {}, v)));

// runs: status, error, retries, monitored metric, stats, and relative links to the run's files
const statKeys = [...new Set(runs.flatMap(r => Object.keys(r.stats || {})))];
// every val/ metric, as report.md's runs table (the monitored one first), then the step they are at
const valKeys = [...new Set([...(D.metric ? [D.metric] : []), ...runs.flatMap(r => Object.keys(r.metrics || {})).filter(k => k.startsWith('val/')).sort()])];
// each path segment encoded: names hold '=' ',' '#' ...; this also keeps any 'scheme:' inert
const href = p => String(p).split('/').map(encodeURIComponent).join('/');
const link = (p, text) => el('a', {href: href(p), target: '_blank', rel: 'noopener'}, text);
const runRows = runs.map(r => {
  const L = r.links || {};
  const links = ['config', 'command', 'log', 'checkpoint'].filter(k => L[k]).map(k => link(L[k], k));
  for (const s of L.samples || []) links.push(link(s, String(s).split('/').pop().replace(/^.*__/, '').replace(/\.[^.]*$/, '')));
  return [r.name, r.point, r.seed, el('td', {class: 'status-' + r.status}, String(r.status)), r.retries ?? 0,
    el('td', {class: 'error'}, r.error ?? ''), ...valKeys.map(k => r.metrics?.[k] ?? null), r.val_step ?? null,
    ...statKeys.map(k => r.stats?.[k] ?? null), el('td', {class: 'links', 'data-sort': ''}, ...links)];
});
$('runs').append(table(['run', 'point', 'seed', 'status', 'retries', 'error', ...valKeys, 'val step', ...statKeys, 'files'], runRows));

if (window.Plotly && metrics.length) draw().then(() => { document.body.dataset.ready = '1'; });
else document.body.dataset.ready = '1';
})();
"""
