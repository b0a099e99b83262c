"Checks of the figures in an executed template and its HTML export: colours match the legend, axes are titled, data present."
import json, re
from pathlib import Path

PLOTLY = 'application/vnd.plotly.v1+json'


def notebook_figures(nb_path) -> list[dict]:
    "The plotly figures (`{data, layout}`) among the outputs of an executed notebook, in order."
    nb = json.loads(Path(nb_path).read_text())
    return [o['data'][PLOTLY] for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])
            if PLOTLY in o.get('data', {})]


def _color(t):
    c = (t.get('line') or {}).get('color') or (t.get('marker') or {}).get('color')
    return json.dumps(c) if c is not None else None


def check_figures(nb_path, html_path) -> list[dict]:
    "Assert, for every figure: each trace has its own explicit colour, equal within a legend group, and every axis that holds"
    " a trace has a title; the HTML export holds one plot per figure, each with data. Returns the figures."
    figs = notebook_figures(nb_path)
    assert figs, f'{nb_path}: no plotly figures'
    for i, f in enumerate(figs):
        title = ((f['layout'].get('title') or {}).get('text')) or f'figure {i}'
        groups = {}
        for t in f['data']:
            if t.get('type') in ('table', 'heatmap'): continue
            col = _color(t)
            assert col is not None, f'{title}: trace {t.get("name")!r} has no explicit colour (its legend entry may differ)'
            g = t.get('legendgroup') or t.get('name')
            if g is not None and t.get('type') == 'scatter':
                groups.setdefault(g, set()).add(col)
            for ax in ('xaxis', 'yaxis'):
                ref = t.get(ax[0] + 'axis') or ax[0]
                key = ax + ref[1:]
                text = ((f['layout'].get(key) or {}).get('title') or {}).get('text')
                assert text, f'{title}: {key} (holding {t.get("name")!r}) has no title'
        bad = {g: c for g, c in groups.items() if len(c) > 1}
        assert not bad, f'{title}: legend groups drawn in several colours: {bad}'
    html = Path(html_path).read_text()
    plots = re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', html, flags=re.S)
    assert len(plots) == len(figs), f'{html_path}: {len(plots)} plots for {len(figs)} figures'
    assert all(json.loads(p) for p in plots), 'a plot in the HTML has no traces'
    return figs
