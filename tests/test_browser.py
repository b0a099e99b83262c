"""The explorers in a real browser: JupyterLab from the project venv on loopback, the tutorial notebook run in headless
Debian chromium driven by Playwright (system chromium via executable_path; no browser download), a slider moved and a
dropdown changed, the plots' data read back from plotly's DOM, screenshots saved under test-artifacts/browser/."""
import json, math, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ART = ROOT / 'test-artifacts' / 'browser'


from browser_util import CHROMIUM, FLAGS, free_port as _free_port, missing as _missing

pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or 'ok')



def _wait_ready(port, token, proc, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"JupyterLab exited with {proc.returncode}; see {ART / 'jupyterlab.log'}")
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    raise TimeoutError(f'JupyterLab did not answer on 127.0.0.1:{port} within {timeout}s')


def _settings(folder: Path):
    "User settings: every cell rendered (no windowing, so off-screen plots have a size), no news fetching."
    for ext, name, val in [('@jupyterlab/notebook-extension', 'tracker', {'windowingMode': 'none'}),
                           ('@jupyterlab/apputils-extension', 'notification', {'fetchNews': 'false', 'checkForUpdates': False})]:
        (folder / ext).mkdir(parents=True, exist_ok=True)
        (folder / ext / f'{name}.jupyterlab-settings').write_text(json.dumps(val))


NB = "jupyterapp.shell.currentWidget"
DONE_JS = f"""() => {{
  const nb = {NB}; if (!nb || !nb.sessionContext || !nb.sessionContext.session || !nb.sessionContext.session.kernel) return false;
  const cells = Array.from(nb.content.model.cells).filter(c => c.type === 'code');
  if (cells.some(c => c.outputs.toJSON().some(o => o.output_type === 'error'))) return 'error';
  return nb.sessionContext.session.kernel.status === 'idle' && cells.every(c => c.executionCount !== null);
}}"""
ERRORS_JS = f"""() => Array.from({NB}.content.model.cells).filter(c => c.type === 'code')
  .flatMap(c => c.outputs.toJSON()).filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)"""
TRACE_JS = """([sel, name]) => { const el = document.querySelector(sel + ' .js-plotly-plot');
  if (!el || !el.data) return null; const t = el.data.find(d => d.name === name); return t ? {x: Array.from(t.x), y: Array.from(t.y)} : null; }"""


def _trace(page, sel, name): return page.evaluate(TRACE_JS, [sel, name])


def _min_norm_point(g1, g2):
    "Two-gradient min-norm point (Sener & Koltun, NeurIPS 2018), computed here independently."
    d = [g1[0] - g2[0], g1[1] - g2[1]]; den = d[0] ** 2 + d[1] ** 2
    a = 0.5 if den == 0 else min(max(((g2[0] - g1[0]) * g2[0] + (g2[1] - g1[1]) * g2[1]) / den, 0.0), 1.0)
    return [a * g1[0] + (1 - a) * g2[0], a * g1[1] + (1 - a) * g2[1]]


@pytest.mark.timeout(420)
def test_explorers_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright
    ART.mkdir(parents=True, exist_ok=True)
    work = tmp_path / 'lab'; work.mkdir()
    shutil.copy(ROOT / 'nbs' / 'tutorials' / 'explorers.ipynb', work / 'explorers.ipynb')
    _settings(tmp_path / 'settings')
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, IN_TEST='1', PYTHONHASHSEED='0', JUPYTER_CONFIG_DIR=str(tmp_path / 'config'),
               JUPYTER_RUNTIME_DIR=str(tmp_path / 'runtime'), IPYTHONDIR=str(tmp_path / 'ipython'), JUPYTER_PLATFORM_DIRS='1')
    cmd = [str(BIN / 'jupyter-lab'), '--no-browser', '--ServerApp.open_browser=False', '--ServerApp.ip=127.0.0.1',
           f'--ServerApp.port={port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}',
           f'--ServerApp.root_dir={work}', '--LabApp.expose_app_in_browser=True',
           '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.news_url=None',
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')
    log = open(ART / 'jupyterlab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        _wait_ready(port, token, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={'width': 1500, 'height': 1100})
                page.goto(f'http://127.0.0.1:{port}/lab/tree/explorers.ipynb?token={token}')
                page.wait_for_function(f"() => window.jupyterapp && {NB} && {NB}.sessionContext && {NB}.sessionContext.session "
                                       f"&& {NB}.sessionContext.session.kernel && {NB}.sessionContext.session.kernel.status === 'idle'",
                                       timeout=90_000)
                page.evaluate("jupyterapp.commands.execute('notebook:run-all-cells')")
                done = page.wait_for_function(DONE_JS, timeout=300_000, polling=1000).json_value()
                errors = page.evaluate(ERRORS_JS)
                page.screenshot(path=str(ART / '00_notebook.png'))
                assert done is True and not errors, f"notebook cells failed in the browser: {errors}"

                # 1. MGDA playground: move the angle slider of g2 and read plotly's data back
                mg = '.kdnb-mgda-explorer'
                page.wait_for_function(f"() => document.querySelector('{mg} .js-plotly-plot') !== null", timeout=60_000)
                box = page.locator(mg).first
                box.scroll_into_view_if_needed(); page.wait_for_timeout(500)
                box.screenshot(path=str(ART / '01_mgda_before.png'))
                g2_before = _trace(page, mg, 'g2')
                handle = box.locator('.kdnb-mgda-angle-2 .noUi-handle')
                handle.focus()
                for _ in range(25): page.keyboard.press('ArrowRight')
                page.wait_for_function(f"([sel, x0]) => {{ const el = document.querySelector(sel + ' .js-plotly-plot');"
                                       f" const t = el.data.find(d => d.name === 'g2'); return Math.abs(t.x[1] - x0) > 1e-6; }}",
                                       arg=[mg, g2_before['x'][1]], timeout=30_000)
                page.wait_for_timeout(800)
                g1, g2 = _trace(page, mg, 'g1'), _trace(page, mg, 'g2')
                gs = _trace(page, mg, 'g* (MGDA)')
                shown = float(box.locator('.kdnb-mgda-angle-2 .widget-readout').first.inner_text())
                assert abs(math.degrees(math.atan2(g2['y'][1], g2['x'][1])) % 360 - shown % 360) < 0.01, (g2, shown)
                assert shown > 100.0                                     # the slider moved up from its start at 100 degrees
                want = _min_norm_point([g1['x'][1], g1['y'][1]], [g2['x'][1], g2['y'][1]])
                assert abs(gs['x'][1] - want[0]) < 1e-6 and abs(gs['y'][1] - want[1]) < 1e-6, (gs, want)
                box.screenshot(path=str(ART / '02_mgda_after.png'))

                # 1b. run mode: the time series is drawn
                run_box = page.locator(mg).nth(1)
                run_box.scroll_into_view_if_needed(); page.wait_for_timeout(500)
                run_box.screenshot(path=str(ART / '03_mgda_run.png'))
                assert run_box.locator('.kdnb-mgda-step').count() == 1
                plots = "document.querySelectorAll('.kdnb-mgda-explorer')[1].querySelectorAll('.js-plotly-plot')"
                sel0 = page.evaluate(f"() => {plots}[0].data.find(d => d.name === 'selected cos').x[0]")
                run_box.locator('.kdnb-mgda-step .noUi-handle').focus()
                for _ in range(3): page.keyboard.press('ArrowRight')
                page.wait_for_function(f"() => {plots}[0].data.find(d => d.name === 'selected cos').x[0] !== {sel0}", timeout=30_000)
                page.wait_for_timeout(800)
                bars = page.evaluate(f"() => {{ const t = {plots}[1].data.find(d => d.name === 'weights MGDA'); return [Array.from(t.x), Array.from(t.y)]; }}")
                assert bars[0] == ['resnet_t', 'vit_t'] and abs(sum(bars[1]) - 1) < 1e-9, bars
                run_box.screenshot(path=str(ART / '03b_mgda_run_scrubbed.png'))

                # 2. tokens: the attention heatmap is drawn over the image
                tk = page.locator('.kdnb-tokens-explorer').nth(1)
                tk.scroll_into_view_if_needed(); page.wait_for_timeout(500)
                tk.screenshot(path=str(ART / '04_tokens.png'))
                z = page.evaluate("""() => { const el = document.querySelectorAll('.kdnb-tokens-explorer')[1].querySelector('.js-plotly-plot');
                                       return el.data.find(d => d.name === 'attention').z.flat().length; }""")
                assert z == 64
                kept_js = ("() => Array.from(document.querySelectorAll('.kdnb-tokens-explorer')[1].querySelector('.js-plotly-plot')"
                           ".data.find(d => d.name === 'kept').x).filter(v => v !== null && !Number.isNaN(v)).length")
                assert page.evaluate(kept_js) == 32                      # keep ratio 0.5 of 64 tokens
                tk.locator('.kdnb-tokens-keep .noUi-handle').focus()
                for _ in range(5): page.keyboard.press('ArrowLeft')      # 0.5 -> 0.25 in steps of 0.05
                page.wait_for_function(f"() => ({kept_js})() !== 32", timeout=30_000)
                page.wait_for_timeout(800)
                keep = float(tk.locator('.kdnb-tokens-keep .widget-readout').first.inner_text())
                assert keep < 0.5, keep
                # each key press redraws in turn: wait (bounded) until the figure has caught up with the last one
                want = math.ceil(keep * 64 - 1e-9)
                page.wait_for_function(f"() => ({kept_js})() === {want}", timeout=30_000)
                assert page.evaluate(kept_js) == want, keep
                tk.screenshot(path=str(ART / '04b_tokens_keep.png'))

                # 3. magnitudes: choose 'l2' in the dropdown: every plotted norm after it is 1
                mgx = page.locator('.kdnb-mag-explorer').first
                mgx.scroll_into_view_if_needed()
                mgx.locator('.kdnb-mag-norm select').select_option('l2')
                page.wait_for_function("""() => { const el = document.querySelector('.kdnb-mag-explorer .js-plotly-plot');
                    const t = el.data.find(d => d.name === 'after vit_t'); return t && Array.from(t.y).every(v => Math.abs(v - 1) < 1e-4); }""",
                                       timeout=30_000)
                page.wait_for_timeout(800)
                mgx.screenshot(path=str(ART / '05_magnitudes_l2.png'))
                messages = page.locator('.kdnb-message.kdnb-error').count()
                assert messages >= 2                                     # the bad-input cells show messages, not tracebacks
                page.locator('.kdnb-message.kdnb-error').last.scroll_into_view_if_needed()
                page.screenshot(path=str(ART / '06_messages.png'))
            finally:
                browser.close()
    finally:
        proc.terminate()                                                 # the server we started, by its PID
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()
    print(f'browser test took {time.time() - t0:.1f}s')
