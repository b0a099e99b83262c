"""The docs site in a real browser: a subset of the site (the index, a logit-loss chapter, the MGDA chapter, an explorer
chapter, the `make demo` results page and the whole API reference) built with docs/build.py (myst-nb through
jupyter-cache, as `make docs` builds the whole site), served on a loopback port and crawled with Debian's headless
chromium driven by Playwright (system chromium via executable_path; no browser download). Screenshots go to
test-artifacts/docs/."""
import inspect, json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse
import pytest

ROOT = Path(__file__).resolve().parent.parent
ART = ROOT / 'test-artifacts' / 'docs'
SUBSET = ['nbs/index', 'nbs/04a_logit_losses', 'nbs/06b_mgda', 'nbs/10c_viz_magnitudes', 'pages/demo_results']
FIGURE_CODE = re.compile(r'go\.Figure|FigureWidget|px\.\w+\(|_figure\(|\bplot_\w+\(|Explorer\(|\.show\(\)')


from browser_util import CHROMIUM, FLAGS, free_port as _free_port, missing as _missing

pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or 'ok')



def _source_nb(doc: str) -> Path:
    return ROOT / (doc + '.ipynb') if doc.startswith('nbs/') else ROOT / 'docs' / (doc + '.ipynb')


def _makes_figure(doc: str) -> bool:
    "From the notebook's own code: a cell that builds a plotly figure or an explorer (and is not skipped in the docs)."
    nb = json.loads(_source_nb(doc).read_text())
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or re.search(r'^#\|\s*(eval:\s*false|slow|gpu)', src, re.M): continue
        if FIGURE_CODE.search(src) and not re.match(r'\s*#\|\s*export', src): return True
    return False


def _docs_of(out: Path) -> list:
    "The notebook pages of a built site (docnames)."
    return sorted(p.relative_to(out).with_suffix('').as_posix() for p in [*out.glob('nbs/**/*.html'), *out.glob('pages/*.html')])


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    if os.environ.get('KDNB_DOCS_SITE'):            # check a site built already (the full one: `make docs`) instead
        out = Path(os.environ['KDNB_DOCS_SITE']).resolve()
        assert (out / 'index.html').exists(), f'no built site in {out}'
        yield from _serve(out, _docs_of(out)); return
    out = tmp_path_factory.mktemp('site')
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / 'docs' / 'build.py'), '--out', str(out), '--only', *SUBSET],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    print(f'docs subset built in {time.time() - t0:.1f}s')
    yield from _serve(out, SUBSET)


def _serve(out, docs):
    port = _free_port()
    srv = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f'http://127.0.0.1:{port}/'
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(base, timeout=2): break
            except OSError: time.sleep(0.1)
        yield dict(out=out, base=base, docs=docs)
    finally:
        srv.terminate()                                                  # the server we started, by its PID
        try: srv.wait(timeout=10)
        except subprocess.TimeoutExpired: os.killpg(srv.pid, signal.SIGKILL); srv.wait()


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try: yield b
        finally: b.close()


PLOT_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
  traces: (el.data || []).length,
  points: (el.data || []).reduce((n, t) => n + ['x', 'y', 'z', 'values', 'r'].reduce((m, k) =>
          m + (t[k] && t[k].length ? (Array.isArray(t[k][0]) ? t[k].flat().length : t[k].length) : 0), 0), 0),
  drawn: el.querySelectorAll('.main-svg').length }))"""


@pytest.mark.timeout(600)
def test_docs_site_in_browser(site, browser):
    ART.mkdir(parents=True, exist_ok=True)
    base, out = site['base'], site['out']
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    errors, outside = [], []
    page.on('console', lambda m: errors.append((page.url, m.text)) if m.type == 'error' else None)
    page.on('pageerror', lambda e: errors.append((page.url, str(e))))
    # a request the page itself dropped (the search page fetching result snippets while the test moves on) is no error
    page.on('requestfailed', lambda r: None if 'ERR_ABORTED' in (r.failure or '') else errors.append((page.url, f'request failed: {r.url} ({r.failure})')))

    def _route(route):                                                   # the site must not need the network
        if urlparse(route.request.url).hostname == '127.0.0.1': route.continue_()
        else: outside.append(route.request.url); route.abort()
    page.route('**/*', _route)

    # crawl every internal link from the index; every page loads without a console error
    seen, todo, ids, links, plots = set(), [base + 'index.html'], {}, [], {}
    while todo:
        url = todo.pop()
        if url in seen: continue
        seen.add(url)
        resp = page.goto(url, wait_until='load')
        assert resp is not None and resp.status == 200, f'{url}: HTTP {resp and resp.status}'
        page.wait_for_timeout(100)
        ids[url] = set(page.eval_on_selector_all('[id]', 'els => els.map(e => e.id)'))
        plots[url] = page.evaluate(PLOT_JS)
        for href in page.eval_on_selector_all('a[href]', 'els => els.map(e => e.href)'):
            if not href.startswith(base): continue
            target, frag = urldefrag(href)
            target = target.split('?')[0]
            if target.endswith('/'): target += 'index.html'
            links.append((url, target, frag))
            if target.endswith('.html') and target not in seen: todo.append(target)
    assert not errors, f'console errors: {errors[:10]}'
    assert not outside, f'pages asked for outside resources: {sorted(set(outside))[:10]}'
    pages = {u[len(base):] for u in seen}
    docs = site['docs']
    for doc in ['index', 'api/index', 'api/kdnb.losses.logit', *docs]:
        assert f'{doc}.html' in pages, f'{doc}.html was not reached from the index'
    assert len(pages) >= 25, sorted(pages)

    # no broken internal link: every target page loaded, every #fragment names an element on it
    broken = []
    for src, target, frag in links:
        if target.endswith('.html'):
            if target not in ids: broken.append((src, target)); continue
            if frag and frag not in ids[target]: broken.append((src, f'{target}#{frag}'))
        else:
            try: urllib.request.urlopen(target, timeout=5).close()
            except OSError: broken.append((src, target))
    assert not broken, f'broken internal links: {broken[:10]}'

    # every chapter that makes a figure shows at least one rendered plotly figure with data
    with_fig = [d for d in docs if _makes_figure(d)]
    assert {'nbs/04a_logit_losses', 'nbs/06b_mgda', 'nbs/10c_viz_magnitudes'} <= set(with_fig), with_fig
    print(f'{len(pages)} pages crawled; {len(with_fig)} of {len(docs)} notebooks make a figure')
    for d in docs:
        ok = [p for p in plots[base + d + '.html'] if p['traces'] > 0 and p['points'] > 0 and p['drawn'] > 0]
        if d in with_fig: assert ok, f'{d}: no rendered plotly figure with data ({plots[base + d + ".html"]})'
    # the explorer shows a snapshot saying how to get the live version
    page.goto(base + 'nbs/10c_viz_magnitudes.html', wait_until='load')
    assert page.locator('.kdnb-snapshot .js-plotly-plot').count() >= 1
    assert 'make lab' in page.locator('.kdnb-snapshot-note').first.inner_text()
    page.locator('.kdnb-snapshot').first.scroll_into_view_if_needed(); page.wait_for_timeout(300)
    page.screenshot(path=str(ART / '02_explorer_snapshot.png'))

    # the MGDA chapter: its figure, and the offline search finds it
    page.goto(base + 'nbs/06b_mgda.html', wait_until='load')
    page.locator('.js-plotly-plot').first.scroll_into_view_if_needed(); page.wait_for_timeout(300)
    page.screenshot(path=str(ART / '01_mgda_chapter.png'))
    page.goto(base + 'search.html?q=MGDA', wait_until='load')
    page.wait_for_function("() => document.querySelectorAll('#search-results li a, ul.search li a').length > 0", timeout=30_000)
    hits = page.eval_on_selector_all('#search-results li a, ul.search li a', 'els => els.map(e => e.href)')
    assert any(h.split('#')[0].endswith('nbs/06b_mgda.html') for h in hits), hits

    # the API page of kd_loss shows its signature (as inspect sees it)
    from kdnb.losses.logit import kd_loss
    page.goto(base + 'api/kdnb.losses.logit.html#kd-loss', wait_until='load')
    sec = page.locator('section#kd-loss')
    assert sec.count() == 1
    code = sec.locator('pre').first.inner_text()
    assert code.startswith('def kd_loss(')
    flat = code.replace(' ', '').replace('\n', '')
    for name, p in inspect.signature(kd_loss).parameters.items():
        dflt = '' if p.default is inspect.Parameter.empty else '=' + re.escape(repr(p.default))
        assert re.search(rf'[(,]{name}(:[^,=)]+)?{dflt}[,)]', flat), (name, code)
    assert 'Hinton' in sec.inner_text()                                  # its docstring
    assert sec.locator('a[href*="04a_logit_losses.html"]').count() >= 1  # and its notebook
    page.screenshot(path=str(ART / '03_api_kd_loss.png'))
    assert not errors, f'console errors: {errors[:10]}'
    for f in ('01_mgda_chapter.png', '02_explorer_snapshot.png', '03_api_kd_loss.png'):
        assert (ART / f).stat().st_size > 10_000, f
