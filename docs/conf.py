"""Sphinx configuration of the kdnb docs site (built by docs/build.py: `make docs`).

The source folder is assembled by docs/build.py under docs/_build/src: a link to nbs/ (the notebooks, executed with
myst-nb through jupyter-cache at test sizes), the generated API reference (api/) and the static pages (pages/).
"""
import hashlib, os, re, sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))
import nbformat  # noqa: E402

project = 'kdnb'
author = 'kdnb authors'
copyright = '2026 onwards, kdnb authors'
extensions = ['myst_nb']
root_doc = 'index'
include_patterns = ['index.md', 'api/*.md', 'pages/*.md', 'pages/*.ipynb', 'nbs/*.ipynb', 'nbs/experiments/*.ipynb',
                    'nbs/tutorials/*.ipynb', 'nbs/course/*.ipynb', 'nbs/course/*/*.ipynb']
exclude_patterns = ['**/.ipynb_checkpoints', '**/runs', '**/_proc', '**/_docs']
_only = [d for d in os.environ.get('KDNB_DOCS_ONLY', '').split(',') if d]   # docs/build.py --only: a subset
if _only: include_patterns = [f'{d}{ext}' for d in _only for ext in ('.md', '.ipynb')] + ['api/*.md']

html_theme = 'sphinx_book_theme'
html_title = 'kdnb'
html_static_path = [str(DOCS / '_static'), str(DOCS / '_build' / 'static')]
html_js_files = ['plotly.min.js']                 # copied from the plotly package by build.py: no CDN
html_css_files = ['kdnb.css']
html_theme_options = {'show_toc_level': 2, 'use_download_button': False, 'use_fullscreen_button': False,
                      'home_page_in_toc': True, 'show_navbar_depth': 1}
html_context = {'default_mode': 'light'}           # the theme logs a console error when no mode is set
html_last_updated_fmt = None
html_copy_source = False

myst_enable_extensions = ['colon_fence', 'dollarmath', 'deflist']
myst_heading_anchors = 4
nb_execution_mode = 'cache'
nb_execution_cache_path = os.environ.get('KDNB_DOCS_CACHE') or str(DOCS / '_build' / 'jupyter_cache')
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_ipywidgets_js = {}                             # widgets render as static snapshots (kdnb_docs_display): no CDN
nb_merge_streams = True
suppress_warnings = ['mystnb.unknown_mime_type', 'myst.xref_missing']

# ---------------------------------------------------------------------------------------------------------------
# nbdev notebooks -> myst-nb: `#|` directives become myst-nb cell tags, a hidden first cell installs the display hooks
SKIP_FLAGS = {'slow', 'gpu'}                      # settings.ini tst_flags: cells nbdev_test skips are not run here
_DIRECTIVE = re.compile(r'^\s*#\|\s*(.*)$')


def _hash_files(paths) -> str:
    h = hashlib.md5()
    for p in sorted(paths): h.update(p.read_bytes())
    return h.hexdigest()[:12]


# the executed outputs depend on the library and the display hooks too: a change there re-executes the notebooks
_LIB_HASH = _hash_files([*ROOT.glob('kdnb/**/*.py'), DOCS / 'kdnb_docs_display.py'])
SETUP_CELL = (f"# docs build setup (kdnb {_LIB_HASH})\nimport kdnb_docs_display\nkdnb_docs_display.install()")


def _directives(src: str):
    "nbdev's leading `#|` lines of a cell: ({name: value}, the source without them)."
    lines, out = src.splitlines(), {}
    i = 0
    while i < len(lines) and (_DIRECTIVE.match(lines[i]) or not lines[i].strip()):
        m = _DIRECTIVE.match(lines[i])
        if m:
            parts = m.group(1).replace(':', ' ').split()
            if parts: out[parts[0].lower()] = ' '.join(parts[1:]).lower()
        i += 1
    return out, '\n'.join(lines[i:])


def nbdev_to_mystnb(nb, name: str = ''):
    "Map nbdev cell directives onto myst-nb tags (hide, echo/output/eval false, test flags) and add the setup cell."
    cells = [nbformat.v4.new_code_cell(SETUP_CELL, metadata={'tags': ['remove-cell']})]
    for c in nb.cells:
        if c.cell_type != 'code': cells.append(c); continue
        d, src = _directives(c.source)
        tags = list(c.metadata.get('tags', []))
        if 'default_exp' in d and not src.strip(): continue
        if 'hide' in d or 'include' in d and d['include'] == 'false': tags.append('remove-cell')
        if d.get('echo') == 'false' or 'hide_input' in d: tags.append('remove-input')
        if d.get('output') == 'false' or 'hide_output' in d: tags.append('remove-output')
        if d.get('eval') == 'false' or SKIP_FLAGS & set(d): tags.append('skip-execution')
        c.source = src
        c.metadata['tags'] = sorted(set(tags))
        cells.append(c)
        if 'parameters' in tags: cells.append(_injected(name, src))
    nb.cells = cells
    return nb


# papermill templates run with their defaults (test sizes under IN_TEST), their outputs written into the build folder
# the results template reads the sweep docs/build.py runs before Sphinx (the distill template over two temperatures)
TEMPLATE_PARAMS = {'results': {'sweep_dir': "os.path.join(_runs, 'sweep-distill')", 'y': "'student_kd.test_acc'"}}


def _injected(name: str, params_src: str):
    "A cell after a template's `parameters` cell, as papermill injects one: out_dir (and inputs) under the build folder."
    defined = set(re.findall(r'^(\w+)\s*=', params_src, re.M))
    lines = ['# parameters injected by the docs build (as papermill would): files go to the build folder', 'import os',
             "_runs = os.environ.get('KDNB_DOCS_RUNS', 'runs')"]
    if 'out_dir' in defined: lines.append(f"out_dir = os.path.join(_runs, {name!r})")
    for k, v in TEMPLATE_PARAMS.get(name, {}).items():
        if k in defined: lines.append(f"{k} = {v}")
    return nbformat.v4.new_code_cell('\n'.join(lines), metadata={'tags': ['injected-parameters']})


def _source_read(app, docname, source):
    if not str(app.env.doc2path(docname)).endswith('.ipynb'): return
    nb = nbdev_to_mystnb(nbformat.reads(source[0], as_version=4), docname.split('/')[-1])
    if docname.startswith('nbs/course/') and not docname.startswith('nbs/course/solutions/'):
        # lessons leave exercises for the reader: a cell that stops at an unfinished exercise shows its error
        nb.metadata['mystnb'] = dict(nb.metadata.get('mystnb', {}), execution_allow_errors=True)
    source[0] = nbformat.writes(nb)


def setup(app):
    app.connect('source-read', _source_read)
    return {'parallel_read_safe': True}
