"Runs and sweeps: status files, sweep resume after SIGKILL, failures, compute-matched comparison, results template."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd, pytest, yaml
from conftest import ROOT, BIN
from kdnb.core import KdnbError
from kdnb.runs import (toy_template, run, sweep, expand_grid, read_grid, run_status, is_complete, load_results,
                       plot_results, compare_at_equal_compute, find_template)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "The toy template (simulated training, no torch): fast papermill runs."
    return toy_template(tmp_path_factory.mktemp('templates'))


@pytest.fixture(scope='module')
def failing_sweep(toy, tmp_path_factory):
    "A finished two-point sweep whose first point fails."
    out = tmp_path_factory.mktemp('sweeps') / 'fail'
    df = sweep(toy, {'fail': [True, False]}, out, fixed={'epochs': 1, 'key': 'kd'}, progress=False)
    return out, df


def _lines(p): return Path(p).read_text().split() if Path(p).exists() else []


def test_sweep_resume_after_sigkill(toy, tmp_path):
    "Kill the `kdnb sweep` process mid-point with SIGKILL, start it again: nothing finished is re-run, nothing lost."
    log, out = tmp_path / 'runs.log', tmp_path / 'sweep'
    grid = tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'grid': {'seed': [0, 1]},
                                    'fixed': {'epochs': 1, 'steps_per_epoch': 20, 'step_s': 0.05, 'log_file': str(log)}}))
    cmd = [str(BIN / 'kdnb'), 'sweep', str(toy), str(grid), '--out', str(out)]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:         # wait until point 0 is done and point 1 is inside its cell
            done = [d for d in out.glob('seed=*') if (run_status(d) or {}).get('status') == 'done']
            if len(done) == 1 and len(_lines(log)) == 2: break
            assert p.poll() is None, 'the sweep ended before it could be killed'
            time.sleep(0.02)
        else: pytest.fail('the sweep did not reach its second point in time')
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    first, second = _lines(log)
    m0 = out / first / 'metrics.json'; mtime0 = m0.stat().st_mtime
    assert is_complete(out / first) and not is_complete(out / second)
    assert run_status(out / second)['status'] == 'killed'            # 'running', but its process is gone
    before = load_results(out)                                        # the table written after point 0 survives the kill
    assert before.set_index('point').loc[first, 'status'] == 'done' and len(before) == 2
    (out / second / 'half-written.tmp').write_text('x')               # leftovers of the killed point

    g, fixed = read_grid(grid)                                        # start again (in this process: same code path)
    df = sweep(toy, g, out, fixed=fixed, progress=False)
    runs = _lines(log)
    assert runs.count(first) == 1 and runs.count(second) == 2 and len(runs) == 3   # only the killed point ran again
    assert m0.stat().st_mtime == mtime0
    assert not (out / second / 'half-written.tmp').exists()           # re-run from scratch
    assert list(df.status) == ['done'] * 2 and sorted(df.seed) == [0, 1]
    assert df['toy.test_acc'].notna().all() and (df['toy.compute.steps'] == 20).all()
    assert list(load_results(out).point) == list(pd.read_csv(out / 'results.csv').point) == list(df.point)


def test_failure_recorded_without_stopping(failing_sweep):
    out, df = failing_sweep
    assert list(df.status) == ['failed', 'done']
    assert 'toy run asked to fail' in df.error[0] and pd.isna(df.error[1])
    st = run_status(out / df.point[0])
    assert st['status'] == 'failed' and 'RuntimeError' in st['error']
    assert df['kd.test_acc'].isna()[0] and df['kd.test_acc'][1] > 0.5
    assert (out / df.point[0] / 'toy.ipynb').exists()                 # the partial notebook is kept


def test_fail_fast_stops_and_keeps_table(toy, tmp_path):
    out = tmp_path / 'ff'
    with pytest.raises(Exception, match='toy run asked to fail'):
        sweep(toy, [{'fail': True}, {'fail': False}], out, fixed={'epochs': 1}, fail_fast=True, progress=False)
    df = load_results(out)
    assert list(df.status) == ['failed', 'pending']


def test_compare_at_equal_steps(toy, tmp_path):
    log = tmp_path / 'log'
    method = dict(overhead=1.5, rate=0.06, step_s=0.01, epochs=1, steps_per_epoch=40, key='mgda', log_file=str(log))
    base = dict(rate=0.04, step_s=0.01, epochs=1, steps_per_epoch=25, key='kd', log_file=str(log))
    cmp = compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', match='steps')
    assert cmp['method']['compute']['steps'] == 40 and cmp['baseline_default']['compute']['steps'] == 25
    assert cmp['baseline_equal']['compute']['steps'] == 40                        # the budget bound, not its epochs
    assert cmp['baseline_equal']['params']['epochs'] == 2 and cmp['budget']['budget_steps'] == 40   # planned: 2 epochs of 25 hold 40
    assert cmp['baseline_equal']['schedule'] == dict(name='toy', planned_steps=40, steps=40, steps_per_epoch=25, complete=True)
    saved = json.loads((tmp_path / 'cmp' / 'baseline_equal_steps' / 'params.json').read_text())
    assert saved['budget_steps'] == 40 and saved['budget_seconds'] is None
    assert cmp['budget_ratio'] == 1.0
    assert 1.1 < cmp['step_time_ratio'] < 2.0                                       # 1.5x per step
    assert cmp['overhead_ratio'] > 1.5                                              # 40 dearer steps vs 25 steps
    assert cmp['acc_delta_equal_compute'] == pytest.approx(cmp['method']['test_acc'] - cmp['baseline_equal']['test_acc'])
    assert 0 < cmp['acc_delta_equal_compute'] < cmp['acc_delta_default']
    assert json.loads((tmp_path / 'cmp' / 'compare.json').read_text())['match'] == 'steps'
    assert len(_lines(log)) == 3
    again = compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', match='steps')
    assert len(_lines(log)) == 3 and again['method']['test_acc'] == cmp['method']['test_acc']   # finished runs reused
    with pytest.raises(KdnbError, match=r"`method_key`.*\['mgda'\]"):
        compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', method_key='kd')
    with pytest.raises(KdnbError, match=r"`baseline_key`.*\['kd'\]"):
        compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', baseline_key='student')
    assert len(_lines(log)) == 3


def _plotly_array(v):
    "A trace's x/y from a figure's JSON: a list, or plotly's typed array {dtype, bdata (base64)}."
    import base64, numpy as np
    if isinstance(v, dict) and 'bdata' in v: return np.frombuffer(base64.b64decode(v['bdata']), dtype=np.dtype(v['dtype'])).tolist()
    return list(v) if v is not None else []


def html_figures(html: str) -> list:
    "The trace lists of the plotly figures in an exported HTML page (the `Plotly.newPlot(id, data, layout)` calls)."
    import re
    return [json.loads(m) for m in re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', html, flags=re.S)]


def test_results_template(failing_sweep, tmp_path):
    "The results template through papermill on a sweep folder; its HTML (code hidden) holds the figures with their data."
    out, df = failing_sweep
    m = run('results', {'sweep_dir': str(out), 'x': 'fail', 'y': 'kd.test_acc'}, tmp_path / 'res', progress=False, hide_code=True)
    assert m['points'] == 2 and m['done'] == 1 and m['best']['point'] == df.point[1]
    assert (tmp_path / 'res' / 'plot.html').exists() and (tmp_path / 'res' / 'results.html').exists()
    assert len(pd.read_csv(tmp_path / 'res' / 'table.csv')) == 1
    html = (tmp_path / 'res' / 'results.html').read_text()
    figs = html_figures(html)
    assert len(figs) == 2, 'the plot and the per-model bars'
    acc = df['kd.test_acc'].dropna().tolist()
    assert _plotly_array(figs[0][0]['y']) == pytest.approx(acc) and _plotly_array(figs[1][0]['y']) == pytest.approx(acc)
    assert 'hl-ipython3"' not in html and 'load_results' not in html        # no code cells
    from kdnb.runs import export_html
    full = export_html(tmp_path / 'res' / 'results.ipynb', tmp_path / 'full.html').read_text()
    assert 'hl-ipython3"' in full and 'load_results' in full


def test_plot_results_means_over_repeats():
    df = pd.DataFrame(dict(status='done', lr=[0.1, 0.1, 0.2, 0.2], T=[1, 1, 1, 4], acc=[0.5, 0.7, 0.8, 0.9]))
    fig = plot_results(df, x='lr', y='acc', color='T')
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {'T=1', 'T=4'}
    assert list(traces['T=1'].y) == pytest.approx([0.6, 0.8]) and traces['T=1'].error_y.array[0] == pytest.approx(0.1414, abs=1e-3)
    two = plot_results(df, x='lr', y=['acc', 'T'])
    assert {t.name for t in two.data} == {'acc', 'T'}
    with pytest.raises(KdnbError, match='`color`'): plot_results(df, x='lr', y=['acc', 'T'], color='T')
    with pytest.raises(KdnbError, match='`df`'): plot_results(df.iloc[:0], x='lr', y='acc')


# --- bad input: a KdnbError naming the argument, before anything runs ---

def test_unknown_template_parameter(toy, tmp_path):
    with pytest.raises(KdnbError, match=r"`params`.*'epochs'"): run(toy, {'epoch': 2}, tmp_path / 'r')
    with pytest.raises(KdnbError, match='`params`'): sweep(toy, {'epoch': [1, 2]}, tmp_path / 's')
    with pytest.raises(KdnbError, match='`params`'): compare_at_equal_compute(toy, {'epoch': 1}, toy, {}, tmp_path / 'c')
    assert not (tmp_path / 'r').exists() and not (tmp_path / 's').exists() and not (tmp_path / 'c').exists()


def test_unknown_template(tmp_path):
    with pytest.raises(KdnbError, match='`template`'): find_template('no_such_template')
    with pytest.raises(KdnbError, match='`template`'): sweep('no_such_template', {'seed': [0]}, tmp_path / 's')


def test_out_dir_is_a_file(toy, tmp_path):
    f = tmp_path / 'file.txt'; f.write_text('x')
    with pytest.raises(KdnbError, match='`out_dir`'): run(toy, {}, f)
    with pytest.raises(KdnbError, match='`out_root`'): sweep(toy, {'seed': [0]}, f)
    with pytest.raises(KdnbError, match='`out_root`'): compare_at_equal_compute(toy, {}, toy, {}, f)


@pytest.mark.parametrize('grid', [{}, [], {'seed': 1}, {'seed': []}, {'seed': (x for x in [1])}, 'seed', [1, 2],
                                  [{'seed': 0}, {'seed': 0}]])
def test_bad_grid(toy, tmp_path, grid):
    with pytest.raises(KdnbError, match='`grid`'): sweep(toy, grid, tmp_path / 's')
    assert not (tmp_path / 's').exists()


def test_bad_fixed_and_out_dir_in_grid(toy, tmp_path):
    with pytest.raises(KdnbError, match='`fixed`'): expand_grid({'seed': [0, 1]}, fixed={'seed': 2})
    with pytest.raises(KdnbError, match='`fixed`'): expand_grid({'seed': [0, 1]}, fixed=[('epochs', 1)])
    with pytest.raises(KdnbError, match='`grid`'): expand_grid({'out_dir': ['a', 'b']})


def test_sweep_folder_of_another_template(toy, failing_sweep, tmp_path):
    other = toy_template(tmp_path, name='other')
    with pytest.raises(KdnbError, match=r"`out_root`.*'toy'"): sweep(other, {'seed': [0]}, failing_sweep[0])


def test_unknown_match_mode(toy, tmp_path):
    with pytest.raises(KdnbError, match=r"`match`.*'steps'"): compare_at_equal_compute(toy, {}, toy, {}, tmp_path, match='flops')


def test_compare_needs_budget_parameters(toy, tmp_path):
    with pytest.raises(KdnbError, match='`baseline_template`.*budget_steps'):
        compare_at_equal_compute(toy, {}, 'distill', {}, tmp_path / 'c')
    with pytest.raises(KdnbError, match='`method_template`'):
        compare_at_equal_compute('distill', {}, toy, {}, tmp_path / 'c')
    assert not (tmp_path / 'c').exists()


def test_read_grid_forms(tmp_path):
    f = tmp_path / 'g.yaml'
    f.write_text('grid: {lr: [0.1, 0.2]}\nfixed: {epochs: 3}\n'); assert read_grid(f) == ({'lr': [0.1, 0.2]}, {'epochs': 3})
    f.write_text('lr: [0.1, 0.2]\nT: [1]\n'); assert read_grid(f) == ({'lr': [0.1, 0.2], 'T': [1]}, None)
    f.write_text('points: [{lr: 0.1}, {lr: 0.3, T: 2}]\n'); assert read_grid(f) == ([{'lr': 0.1}, {'lr': 0.3, 'T': 2}], None)
    for bad in ['', 'just text', 'grid: {lr: [1]}\npoints: [{lr: 1}]\n', 'fixed: {epochs: 3}\n', 'lr: [1\n']:
        f.write_text(bad)
        with pytest.raises(KdnbError, match='`grid_file`'): read_grid(f)
    with pytest.raises(KdnbError, match='`grid_file`'): read_grid(tmp_path / 'missing.yaml')


def test_compare_at_equal_seconds_plans_the_baseline(toy, tmp_path):
    "Seconds become steps from a warm-up run's measured step time; the baseline is never stopped by the clock."
    method = dict(overhead=2.0, rate=0.06, step_s=0.01, epochs=1, steps_per_epoch=30, key='m')
    base = dict(rate=0.04, step_s=0.01, epochs=1, steps_per_epoch=25, key='b')
    cmp = compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', match='seconds', run_default=False, warmup_steps=10)
    warm = json.loads((tmp_path / 'cmp' / 'baseline_warmup' / 'params.json').read_text())
    assert warm['budget_steps'] == 10 and warm['budget_seconds'] is None
    eq = cmp['baseline_equal']
    assert eq['params']['budget_seconds'] is None and eq['params']['budget_steps'] == cmp['budget']['budget_steps']
    step_s = cmp['budget']['baseline_step_s_measured']
    assert cmp['budget']['budget_steps'] == round(cmp['budget']['budget_seconds'] / step_s)
    assert eq['schedule']['complete'] and eq['compute']['steps'] == eq['schedule']['planned_steps'] > 40   # ~2x the method's 30
    assert cmp['baseline_schedule_complete'] is True and 0.5 < cmp['timing']['wall_ratio'] < 1.5
    assert cmp['baseline_default'] is None and 'default' not in cmp['deltas']
    assert any('baseline schedule: completed' in v for v in cmp['verdict'])


def test_compare_over_seeds_reports_mean_spread_and_noise(toy, tmp_path):
    method = dict(overhead=1.5, rate=0.06, epochs=1, key='m')
    base = dict(rate=0.04, epochs=1, key='b')
    cmp = compare_at_equal_compute(toy, method, toy, base, tmp_path / 'cmp', match='steps', seeds=[3, 4])
    assert sorted(p.name for p in (tmp_path / 'cmp').iterdir() if p.is_dir()) == [
        'baseline_default-seed3', 'baseline_default-seed4', 'method-seed3', 'method-seed4']   # same plan: own runs reused
    assert [e['seed'] for e in cmp['runs']['method']] == [3, 4] and cmp['budget']['own_settings_match']
    st = cmp['stats']['method']
    assert st['n'] == 2 and st['std'] == 0 and st['test_size'] == 1000
    assert st['se'] == pytest.approx((st['mean'] * (1 - st['mean']) / 1000) ** 0.5)
    d = cmp['deltas']['equal']
    assert d['delta'] == pytest.approx(cmp['stats']['method']['mean'] - cmp['stats']['baseline_equal']['mean'])
    assert d['within_noise'] is False and 'beyond the noise' in d['text']
    frame = __import__('kdnb.runs', fromlist=['comparison_frame']).comparison_frame(cmp)
    assert frame.loc['method', 'seeds'] == 2 and frame.loc['baseline_equal', 'schedule_done']
    with pytest.raises(KdnbError, match='`seeds`'): compare_at_equal_compute(toy, method, toy, base, tmp_path / 'c2', seeds=[1, 1])
    with pytest.raises(KdnbError, match='`seeds`'): compare_at_equal_compute(toy, method, toy, base, tmp_path / 'c2', seeds='0')
    with pytest.raises(KdnbError, match='`warmup_steps`'): compare_at_equal_compute(toy, method, toy, base, tmp_path / 'c2', warmup_steps=0)
