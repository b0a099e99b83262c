"""Build the kdnb docs site: `make docs` (the whole site) or `python docs/build.py --only DOC ...` (a subset).

Assembles the Sphinx source folder under the build folder (a link to nbs/, the static pages, a generated index and API
reference), then runs sphinx-build with myst-nb: every notebook is executed at test sizes (IN_TEST=1) through
jupyter-cache, so a rebuild with unchanged notebooks and library re-executes nothing.
"""
import argparse, importlib, inspect, os, re, shutil, subprocess, sys, time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
NBS = ROOT / 'nbs'
BUILD = DOCS / '_build'

SECTIONS = [  # (caption, folder under nbs/, glob): book order is filename order within each
    ('Chapters', '', '[0-9]*.ipynb'),
    ('Experiment templates', 'experiments', '*.ipynb'),
    ('Tutorials', 'tutorials', '*.ipynb'),
    ('Course', 'course', '*.ipynb'),
    ('Course solutions', 'course/solutions', '*.ipynb'),
]


def _write(path: Path, text: str):
    "Write only when the text changed (Sphinx rebuilds what has a newer mtime)."
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text: path.write_text(text)


def _title(nb_path: Path) -> str:
    import nbformat
    nb = nbformat.read(nb_path, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'markdown':
            m = re.search(r'^#\s+(.+)$', c.source, re.M)
            if m: return m.group(1).strip()
    return nb_path.stem


def sections(only=None):
    "[(caption, [docname])] of the notebooks, in book order; `only`: keep just these docnames."
    out = []
    for cap, sub, pat in SECTIONS:
        folder = NBS / sub if sub else NBS
        if not folder.is_dir(): continue
        docs = [f"nbs/{p.relative_to(NBS).with_suffix('').as_posix()}" for p in sorted(folder.glob(pat))]
        if only is not None: docs = [d for d in docs if d in only]
        if docs: out.append((cap, docs))
    return out


# ------------------------------------------------------------------------------------------------ API reference
def _notebook_of(mod, name: str):
    "The notebook a symbol was exported from: nbdev's `# %% ../nbs/X.ipynb` cell marker above its definition."
    src = Path(inspect.getsourcefile(mod)).read_text().splitlines()
    head = name.split('.')[0]
    pat = re.compile(rf'^(def|async def|class)\s+{re.escape(head)}\b|^{re.escape(head)}\s*[:=]')
    nb = None
    for line in src:
        m = re.match(r'^# %% (\S+\.ipynb)', line)
        if m: nb = m.group(1)
        elif pat.match(line) and nb: return Path(nb).stem
    m = re.search(r'File to edit: (\S+\.ipynb)', '\n'.join(src[:5]))
    return Path(m.group(1)).stem if m else None


def _show_doc(obj, name: str, level: int) -> str:
    "nbdev's show_doc markdown (signature and docstring), without its external source link."
    from nbdev.showdoc import BasicMarkdownRenderer
    md = BasicMarkdownRenderer(obj, name=name)._repr_markdown_()
    md = re.sub(r'^---\s*\n', '', md.strip())
    md = re.sub(r'^\[source\]\([^)]*\)\{[^}]*\}\s*\n', '', md.strip())
    return re.sub(r'^#{2,4} ', '#' * level + ' ', md.strip(), count=1, flags=re.M)


def api_pages() -> dict:
    "{relative path: markdown} of the API reference: one page per module, every exported symbol."
    from kdnb._modidx import d
    pages, rows = {}, []
    for modname, syms in sorted(d['syms'].items()):
        mod = importlib.import_module(modname)
        public = [k[len(modname) + 1:] for k in syms]
        public = [n for n in public if not any(p.startswith('_') for p in n.split('.'))]
        tops = [n for n in public if '.' not in n]
        allnames = list(getattr(mod, '__all__', []))
        tops += [n for n in allnames if n not in tops and not n.startswith('_')]
        order = {n: i for i, n in enumerate(allnames)}
        tops.sort(key=lambda n: order.get(n, 10 ** 6))
        doc = (inspect.getdoc(mod) or '').strip()
        lines = [f'# {modname}', '', doc, '']
        nbs_used = []
        for top in tops:
            obj = getattr(mod, top, None)
            nb = _notebook_of(mod, top)
            if nb and nb not in nbs_used: nbs_used.append(nb)
            if callable(obj) or inspect.isclass(obj):
                lines.append(_show_doc(obj, top, 2))
            else:
                if isinstance(obj, dict): r = f"{len(obj)} entries: " + ', '.join(map(str, obj))
                else: r = re.sub(r' at 0x[0-9a-f]+', '', repr(obj)); r = r if len(r) < 300 else r[:300] + ' ...'
                lines += [f'## {top}', '', '```text', f'{top}: {type(obj).__name__} = {r}', '```']
            if nb: lines += ['', f'Defined in the notebook {{doc}}`{nb} </nbs/{nb}>`.']
            for meth in (n for n in public if n.startswith(top + '.')):
                m = inspect.getattr_static(obj, meth.split('.', 1)[1], None)
                m = getattr(obj, meth.split('.', 1)[1], None) if m is None or isinstance(m, (staticmethod, classmethod)) else m
                if isinstance(m, property): m = m.fget
                if m is not None: lines += ['', _show_doc(m, meth, 3)]
            lines.append('')
        pages[f'api/{modname}.md'] = '\n'.join(lines)
        first = doc.split('\n\n')[0].replace('\n', ' ') if doc else ''
        rows.append(f"| [{modname}]({modname}.md) | {len(tops)} | {', '.join(f'[{n}](../nbs/{n}.ipynb)' for n in nbs_used)} | {first} |")
    pages['api/index.md'] = '\n'.join([
        '# API reference', '',
        'Every exported symbol of kdnb, rendered as nbdev\'s `show_doc` renders it: the signature, the docstring and a link '
        'to the notebook that defines it (the notebooks are the source of the library).', '',
        '```{toctree}', ':hidden:', '', *[f'{m}' for m in sorted(d['syms'])], '```', '',
        '| module | symbols | notebook | what it holds |', '|---|---|---|---|', *rows, ''])
    return pages


# ------------------------------------------------------------------------------------------------ the site
def index_page(secs, pages, with_index=True) -> str:
    out = ['# kdnb', '',
           '> A Jupyter-first research kit for knowledge distillation, above all **multi-teacher** KD.', '',
           'Every chapter, experiment template and tutorial below was executed at test sizes when this site was built, '
           'with its outputs and its plotly figures (interactive: hover, zoom, toggle traces). The explorers are shown as '
           'static snapshots; for the live widgets run `make lab` and the notebook\'s cells. The search box works offline.', '']
    def toc(caption, docs):
        return ['```{toctree}', f':caption: {caption}', ':maxdepth: 1', '', *docs, '```', '']
    start = ['nbs/index'] if with_index and (NBS / 'index.ipynb').exists() else []
    out += toc('Start here', start + [f'pages/{p}' for p in pages])
    for cap, docs in secs: out += toc(cap, docs)
    out += toc('Reference', ['api/index'])
    return '\n'.join(out)


def assemble(src: Path, only=None):
    "The Sphinx source folder: links to nbs/ and docs/pages/, the generated index and API pages."
    src.mkdir(parents=True, exist_ok=True)
    for name, target in (('nbs', NBS), ('pages', DOCS / 'pages')):
        link = src / name
        if link.is_symlink() and Path(os.readlink(link)) == target: continue
        if link.is_symlink() or link.is_file(): link.unlink()
        elif link.exists(): shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)
    secs = sections(only)
    pages = sorted(p.stem for p in (DOCS / 'pages').glob('*.ipynb') if only is None or f'pages/{p.stem}' in only)
    for rel, text in api_pages().items(): _write(src / rel, text)
    _write(src / 'index.md', index_page(secs, pages, only is None or 'nbs/index' in only))
    static = BUILD / 'static'; static.mkdir(parents=True, exist_ok=True)
    import plotly
    js = Path(plotly.__file__).parent / 'package_data' / 'plotly.min.js'
    if not (static / 'plotly.min.js').exists() or (static / 'plotly.min.js').stat().st_size != js.stat().st_size:
        shutil.copyfile(js, static / 'plotly.min.js')
    docs = ['index', 'api/index', *[f'pages/{p}' for p in pages], *(['nbs/index'] if only is None or 'nbs/index' in only else []),
            *[d for _, ds in secs for d in ds]]
    return docs


def _sweep(env):
    "The small sweep the results template's page reads (two temperatures of the distill template, test sizes; resumed)."
    code = ("import os, sys; from kdnb.runs import sweep; "
            "sweep('distill', {'T': [2.0, 4.0]}, os.path.join(os.environ['KDNB_DOCS_RUNS'], 'sweep-distill'), "
            "fixed={'epochs': 1}, progress=False)")
    r = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT / 'nbs' / 'experiments')
    if r.returncode: sys.exit(f'docs: the sweep for the results page failed ({r.returncode})')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(BUILD / 'html'), help='the HTML folder')
    ap.add_argument('--only', nargs='*', default=None, help='build just these docnames (e.g. nbs/06b_mgda), plus the index and API pages')
    ap.add_argument('--jobs', default=os.environ.get('DOCS_JOBS', '2'), help='parallel Sphinx readers (notebook executions)')
    ap.add_argument('--clean', action='store_true', help='drop the HTML folder and the execution cache first')
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    tag = 'full' if a.only is None else 'subset-' + str(abs(hash(tuple(sorted(a.only)))) % 10 ** 8)
    src = BUILD / 'src' / tag
    if a.clean:
        for p in (out, BUILD / 'jupyter_cache', BUILD / 'doctrees' / tag, BUILD / 'runs', src): shutil.rmtree(p, ignore_errors=True)
    t0 = time.time()
    docs = assemble(src, None if a.only is None else set(a.only))
    env = dict(os.environ, IN_TEST='1', PYTHONHASHSEED='0', KDNB_DOCS_ONLY=','.join(docs) if a.only is not None else '',
               KDNB_DOCS_RUNS=str(BUILD / 'runs'),
               PYTHONPATH=os.pathsep.join([str(DOCS), *filter(None, [os.environ.get('PYTHONPATH')])]))
    env.setdefault('OMP_NUM_THREADS', '1')
    if a.only is None or 'nbs/experiments/results' in a.only: _sweep(env)
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(DOCS), '-d', str(BUILD / 'doctrees' / tag),
           '-j', str(a.jobs), '-q', str(src), str(out)]
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode: sys.exit(r.returncode)
    n = sum(1 for p in out.rglob('*.html') if p.name not in ('genindex.html', 'search.html') and '_static' not in p.parts)
    print(f'docs: {n} pages in {out} ({time.time() - t0:.1f}s). Open it with `make docs-serve` '
          f'(http://127.0.0.1:8000/), or {out / "index.html"}')


if __name__ == '__main__':
    main()
