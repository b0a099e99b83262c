"The token_interactions template (IVA and TPA): a smoke papermill run at test size, and bad parameters."
import json
import nbformat, pytest
from kdnb.core import KdnbError
from kdnb.runs import find_template, run, template_parameters

TEMPLATE = 'token_interactions'


def test_parameters_cell():
    p = template_parameters(TEMPLATE)
    for name in ('device', 'seed', 'out_dir', 'epochs', 'teacher_epochs', 'batch_size', 'lr', 'keep_ratio', 'tpa_estimator',
                 'tpa_samples', 'vocab_size', 'budget_steps', 'budget_seconds'):
        assert name in p, name
    assert p['device'] == 'auto' and p['budget_steps'] is None and p['budget_seconds'] is None
    assert p['tpa_estimator'] in ('exact', 'mc') and 0 < p['keep_ratio'] <= 1


def test_smoke_run_mc(tmp_path, monkeypatch):
    "Monte Carlo TPA on a padded vocabulary, every recipe, KD matched to the cost of the TPA run."
    monkeypatch.setenv('IN_TEST', '1')
    m = run(TEMPLATE, {'tpa_estimator': 'mc', 'vocab_size': 64, 'tpa_samples': 4, 'keep_ratio': 0.5, 'seed': 1},
            out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / 'metrics.json').read_text()) == {k: v for k, v in m.items() if k != 'wall_s'}
    assert (tmp_path / 'token_interactions.ipynb').exists() and (tmp_path / 'params.json').exists()
    assert (tmp_path / 'token_interactions.html').exists() and (tmp_path / 'curves.csv').exists()
    assert m['template'] == TEMPLATE and m['dataset'] == 'digits' and m['seed'] == 1 and m['vocab_size'] == 64
    keys = ['teacher', 'student_alone', 'kd', 'kd_iva', 'kd_tpa', 'kd_iva_tpa', 'kd_matched_kd_tpa']
    assert m['primary'] == 'kd_iva_tpa'
    for k in keys:
        e = m[k]
        assert 0.0 <= e['test_acc'] <= 1.0 and 0.0 <= e['seq_acc'] <= e['test_acc'] + 1e-9, (k, e)
        assert 0.0 <= e['last_val_acc'] <= e['best_val_acc'] <= 1.0
        assert set(e['per_instruction']) == {'digit', 'even', 'gt4', 'ink_top', 'ink_left'}
        c = e['compute']
        assert c['steps'] > 0 and c['wall_s'] > 0 and c['samples'] == c['steps'] * 64 and c['backward_passes'] == c['steps']
        assert c['teacher_forwards'] == (0 if k in ('teacher', 'student_alone') else c['samples'])
        assert e['step_ms'] > 0
    # the teacher learned something: better than always answering the most frequent first token (<= 0.2 of pairs here)
    assert m['teacher']['test_acc'] > 0.3, m['teacher']
    # the losses that each recipe added were really computed
    assert set(m['kd']['loss_terms']) == {'ce', 'kd'}
    assert set(m['kd_iva']['loss_terms']) == {'ce', 'kd', 'iva'} and m['kd_iva']['loss_terms']['iva'] > 0
    assert set(m['kd_iva_tpa']['loss_terms']) == {'ce', 'kd', 'iva', 'tpa'} and m['kd_tpa']['loss_terms']['tpa'] > 0
    # overheads are the side-by-side step-time ratios to KD
    assert m['kd']['overhead_vs_kd'] == pytest.approx(1.0)
    for k in ('kd_iva', 'kd_tpa', 'kd_iva_tpa'):
        assert m[k]['overhead_vs_kd'] == pytest.approx(m[k]['bench_step_ms'] / m['kd']['bench_step_ms'])
        assert m[k]['overhead_wall_vs_kd'] == pytest.approx(m[k]['compute']['wall_s'] / m['kd']['compute']['wall_s'])
    # the matched KD run got the KD steps that cost what the TPA run cost (its steps x its step-time overhead)
    mt, tp = m['kd_matched_kd_tpa'], m['kd_tpa']
    n = max(1, round(tp['compute']['steps'] * tp['overhead_vs_kd']))
    assert mt['matched'] == {'to': 'kd_tpa', 'by': 'cost', 'budget': n} and mt['compute']['steps'] == n
    # layer selection: one score per teacher layer, the chosen one is the best
    irs = m['irs']['teacher']
    assert str(m['iva_layer']) in irs and irs[str(m['iva_layer'])] == max(irs.values())
    assert all(0.0 <= v <= 1.0 for v in irs.values()) and set(m['irs']) >= {'teacher', 'kd', 'kd_iva'}
    # with V = 64 the exact estimator is still affordable: it is in the estimator table next to the MC ones
    est = {(r['estimator'], r['S']) for r in m['tpa_estimators']}
    assert ('exact', None) in est and {('mc', 1), ('mc', 4)} <= est
    ex = next(r for r in m['tpa_estimators'] if r['estimator'] == 'exact')['value']
    assert ex > 0 and all(r['rel_rmse'] >= 0 for r in m['tpa_estimators'])


def test_bad_parameter_stops_the_run(tmp_path, monkeypatch):
    "Through papermill: an unknown TPA estimator stops the run in the first cells with a KdnbError, no metrics written."
    import papermill as pm
    monkeypatch.setenv('IN_TEST', '1')
    with pytest.raises((KdnbError, pm.PapermillExecutionError)) as e:   # kdnb.runs re-raises the template's KdnbError
        run(TEMPLATE, {'tpa_estimator': 'sampled'}, out_dir=tmp_path, progress=False)
    assert 'KdnbError' in (type(e.value).__name__, getattr(e.value, 'ename', '')) and '`tpa_estimator`' in str(e.value)
    executed = nbformat.read(tmp_path / 'token_interactions.ipynb', as_version=4)
    failed = [c for c in executed.cells if c.cell_type == 'code' and any(o.get('ename') for o in c.get('outputs', []))]
    assert len(failed) == 1 and 'check_parameters()' in failed[0].source              # it stopped in the check cell
    assert not (tmp_path / 'metrics.json').exists()


def _check_cells(overrides: dict):
    "Run the template's parameters cell, the overrides and its parameter-check cell in this process."
    nb = nbformat.read(find_template(TEMPLATE), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    i = next(j for j, c in enumerate(code) if 'parameters' in c.metadata.get('tags', []))
    assert 'check_parameters()' in code[i + 1].source
    ns = {}
    exec(code[i].source, ns)
    ns.update(overrides)
    exec(code[i + 1].source, ns)


@pytest.mark.parametrize('params, arg', [
    ({'tpa_estimator': 'sampled'}, 'tpa_estimator'),
    ({'keep_ratio': 0.0}, 'keep_ratio'),
    ({'keep_ratio': 1.5}, 'keep_ratio'),
    ({'keep_ratio': '0.5'}, 'keep_ratio'),
    ({'vocab_size': 10}, 'vocab_size'),
    ({'vocab_size': 4096}, 'vocab_size'),                       # too large for the exact V x V estimator
    ({'tpa_samples': 0}, 'tpa_samples'),
    ({'patch_size': 3}, 'patch_size'),
    ({'teacher_heads': 3}, 'teacher_heads'),
    ({'recipes': ['kd', 'tpa_only']}, 'recipes'),
    ({'matched_to': 'kd_iva', 'recipes': ['kd', 'kd_tpa']}, 'matched_to'),
    ({'match_by': 'flops'}, 'match_by'),
    ({'budget_steps': 0}, 'budget_steps'),
    ({'budget_seconds': -1.0}, 'budget_seconds'),
    ({'instructions': ['digit']}, 'instructions'),
    ({'instructions': ['digit', 'colour']}, 'instructions'),
    ({'lr': 0.0}, 'lr'),
    ({'max_train_images': 10}, 'max_train_images'),
])
def test_parameter_checks(params, arg):
    with pytest.raises(KdnbError, match=f'`{arg}`'):
        _check_cells(params)


def test_parameter_checks_pass():
    _check_cells({})                                                            # the defaults
    _check_cells({'tpa_estimator': 'mc', 'vocab_size': 4096, 'keep_ratio': 1.0, 'match_by': 'seconds', 'matched_to': None})


def test_unknown_parameter(tmp_path):
    with pytest.raises(KdnbError, match='keep_ratio'):
        run(TEMPLATE, {'keep_ration': 0.5}, out_dir=tmp_path, progress=False)
