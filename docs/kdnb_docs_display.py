"""Display hooks for the docs build (loaded in each notebook's kernel by a hidden first cell).

A static page has no kernel, so:
- plotly figures render as HTML that draws with the page's own copy of plotly.js (no CDN, no require.js);
- ipywidgets (the explorers, progress bars) render as a snapshot: their plotly figures drawn with the data they had
  when displayed, their text and the state of their controls, and a note on how to get the live version.
"""
import html as _html

LIVE_NOTE = ("Static snapshot of an interactive explorer. For the live version run "
             "<code>make lab</code> (JupyterLab in the project venv) and run the notebook's cells.")


def figure_html(fig) -> str:
    "An HTML div that draws `fig` (a plotly figure or its dict) with the page's plotly.js."
    import plotly.io as pio
    return ('<div class="kdnb-plotly">' + pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                                        config={'responsive': True, 'displaylogo': False}) + '</div>')


def _value(v) -> str:
    if isinstance(v, float): return f'{v:.4g}'
    if isinstance(v, (tuple, list)): return ', '.join(_value(x) for x in v)
    return str(v)


def widget_html(w) -> str:
    "A static rendering of an ipywidget and its children."
    import ipywidgets as W
    from plotly.basewidget import BaseFigureWidget
    if hasattr(w, '_shown'): w._shown = True                 # kdnb's explorers: it has been displayed
    cls = ' '.join(getattr(w, '_dom_classes', ()) or ())
    if isinstance(w, BaseFigureWidget): return figure_html(w.to_dict())
    if type(w).__name__ == 'TqdmHBox': return ''           # a progress bar: its state at display time says nothing
    if isinstance(w, W.Box):
        inner = ''.join(widget_html(c) for c in w.children)
        kind = 'row' if isinstance(w, W.HBox) else 'col'
        return f'<div class="kdnb-w kdnb-w-{kind} {cls}">{inner}</div>'
    if isinstance(w, (W.HTML, W.HTMLMath)): return f'<div class="kdnb-w {cls}">{w.value}</div>'
    if isinstance(w, (W.IntProgress, W.FloatProgress)):
        return f'<progress class="kdnb-w {cls}" max="{w.max - w.min}" value="{w.value - w.min}"></progress>'
    if isinstance(w, W.Output):
        return f'<div class="kdnb-w {cls}"><em>(output area: live only)</em></div>'
    if isinstance(w, W.Button):
        return f'<span class="kdnb-w kdnb-w-button {cls}">{_html.escape(w.description)}</span>'
    if isinstance(w, W.ValueWidget):
        desc = _html.escape(getattr(w, 'description', '') or '')
        return (f'<span class="kdnb-w kdnb-w-control {cls}"><span class="kdnb-w-desc">{desc}</span> '
                f'<code>{_html.escape(_value(w.value))}</code></span>')
    return ''


def _widget_bundle(w, include=None, exclude=None):
    body = widget_html(w)
    if 'js-plotly-plot' in body or 'kdnb-plotly' in body:
        body = f'<div class="kdnb-snapshot"><p class="kdnb-snapshot-note">{LIVE_NOTE}</p>{body}</div>'
    return {'text/html': body, 'text/plain': repr(type(w).__name__)}


def install():
    "Register the docs renderers in the running IPython kernel."
    import plotly.io as pio
    from plotly.io._base_renderers import MimetypeRenderer
    import ipywidgets as W
    from IPython import get_ipython

    class DocsRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict): return {'text/html': figure_html(fig_dict)}

    pio.renderers['kdnb_docs'] = DocsRenderer()
    # a notebook that picks its own renderers (the templates choose 'plotly_mimetype+notebook' for JupyterLab and their
    # HTML export) gets the page's renderer under those names too: one HTML output, no require.js, no inline plotly.js
    for name in list(pio.renderers):
        if name in ('plotly_mimetype', 'jupyterlab', 'nteract', 'vscode') or name.startswith(('notebook', 'colab', 'kaggle', 'azure', 'iframe')):
            pio.renderers[name] = DocsRenderer()
    pio.renderers.default = 'kdnb_docs'
    ip = get_ipython()
    if ip is not None: ip.display_formatter.mimebundle_formatter.for_type(W.Widget, _widget_bundle)
