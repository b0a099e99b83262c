"The `kdnb` command: help for every subcommand, run/sweep/compare/report/templates on the toy template, teachers/cache dispatch."
import json, sys, types
from pathlib import Path
import pytest, yaml
from kdnb.runs import main, toy_template, run_status, load_results

COMMANDS = [[], ['run'], ['sweep'], ['compare'], ['report'], ['templates'], ['teachers'], ['teachers', 'train'],
            ['cache'], ['cache', 'build'], ['demo']]


@pytest.fixture(scope='module')
def toy(tmp_path_factory): return toy_template(tmp_path_factory.mktemp('templates'))


@pytest.mark.parametrize('cmd', COMMANDS, ids=lambda c: ' '.join(c) or 'kdnb')
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e: main(cmd + ['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: kdnb {' '.join(cmd)}".rstrip())
    assert len(out.splitlines()) > 3


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as e: main(['train'])
    assert e.value.code == 2 and 'invalid choice' in capsys.readouterr().err


def test_run_and_report(toy, tmp_path, capsys):
    out = tmp_path / 'r'
    assert main(['run', str(toy), '-p', 'epochs', '1', '-p', 'key', 'kd', '-p', 'steps_per_epoch', '7', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'kd *' in printed and ' 7 ' in printed                     # the results table, primary marked, 7 steps
    params = json.loads((out / 'params.json').read_text())
    assert params['epochs'] == 1 and params['steps_per_epoch'] == 7 and params['key'] == 'kd'   # '1' became an int
    assert run_status(out)['status'] == 'done' and (out / 'toy.html').exists()
    assert main(['report', str(out)]) == 0
    rep = capsys.readouterr().out
    assert ': done' in rep and 'kd *' in rep


def test_sweep_exit_status_no_resume_fail_fast_and_report(toy, tmp_path, capsys):
    log, out, grid = tmp_path / 'log', tmp_path / 'sw', tmp_path / 'grid.yaml'
    grid.write_text(yaml.safe_dump({'grid': {'fail': [False, True]},
                                    'fixed': {'epochs': 1, 'steps_per_epoch': 5, 'log_file': str(log)}}))
    assert main(['sweep', str(toy), str(grid), '--out', str(out)]) == 1     # a point failed: status 1, after all ran
    printed = capsys.readouterr().out
    assert 'failed' in printed and 'done' in printed and 'toy run asked to fail' in printed
    assert len(log.read_text().split()) == 2
    first = load_results(out).point[0]
    # --no-resume runs the finished point again; --fail-fast stops at the failing one
    assert main(['sweep', str(toy), str(grid), '--out', str(out), '--no-resume', '--fail-fast']) == 1
    assert 'stopped at a failing point' in capsys.readouterr().err
    assert log.read_text().split() == [first, load_results(out).point[1]] * 2
    assert main(['report', str(out)]) == 0
    rep = capsys.readouterr().out
    assert 'toy.test_acc' in rep and 'fail' in rep and len(rep.strip().splitlines()) == 3


def test_sweep_plain_mapping_grid_file(toy, tmp_path, capsys):
    grid = tmp_path / 'g.yaml'; grid.write_text('seed: 3\n')
    assert main(['sweep', str(toy), str(grid), '--out', str(tmp_path / 's')]) == 2
    assert '`grid`' in capsys.readouterr().err and not (tmp_path / 's').exists()
    assert main(['sweep', str(toy), str(tmp_path / 'none.yaml')]) == 2
    assert '`grid_file`' in capsys.readouterr().err


def test_compare_and_report(toy, tmp_path, capsys):
    out = tmp_path / 'cmp'
    assert main(['compare', str(toy), str(toy), '-m', 'overhead', '2', '-m', 'key', 'mgda', '-m', 'epochs', '1',
                 '-b', 'key', 'kd', '-b', 'epochs', '1', '--match', 'steps', '--no-default', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'compare at equal steps' in printed and 'baseline_equal' in printed and 'mgda' in printed
    cmp = json.loads((out / 'compare.json').read_text())
    assert cmp['baseline_default'] is None and cmp['baseline_equal']['compute']['steps'] == cmp['method']['compute']['steps'] == 25
    assert main(['report', str(out)]) == 0 and 'budget_steps' in capsys.readouterr().out
    assert main(['compare', str(toy), str(toy), '--match', 'flops', '--out', str(tmp_path / 'c2')]) == 2
    assert '`match`' in capsys.readouterr().err


def test_templates(toy, monkeypatch, capsys):
    monkeypatch.setenv('KDNB_TEMPLATES', str(toy.parent))
    assert main(['templates']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ['template', 'what', '(parameters)'] and out[2].startswith('toy ') and 'Toy template' in out[2]
    assert 'budget_steps' in out[3]
    assert main(['templates', 'toy']) == 0
    rows = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()[4:]}
    assert rows['step_s'].split()[1] == '0.002' and 'simulated seconds per optimizer step' in rows['step_s']
    assert main(['templates', 'tyo']) == 2 and "Did you mean 'toy'" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    for cmd, example in [(['run'], '-p recipes kd,camkd'), (['sweep'], 'points:'), (['compare'], '--match seconds'),
                         ([], 'kdnb templates')]:
        with pytest.raises(SystemExit): main(cmd + ['--help'])
        out = capsys.readouterr().out
        assert 'examples:' in out and example in out, cmd


def test_run_and_sweep_stream_one_line_per_epoch(toy, tmp_path, capsys):
    out = tmp_path / 'r'
    assert main(['run', str(toy), '-p', 'epochs', '3', '-p', 'steps_per_epoch', '4', '-p', 'step_s', '0.05', '--out', str(out)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if '  epoch ' in l]
    assert [l.split('  ')[:3] for l in lines] == [['toy', f'epoch {e}', f'step {4 * e}'] for e in (1, 2, 3)]
    assert all('loss ' in l and 'val_acc ' in l and l.endswith(' s') for l in lines)
    got = [json.loads(l) for l in (out / 'toy' / 'epochs.jsonl').read_text().splitlines()]
    assert [float(l.split('val_acc ')[1].split()[0]) for l in lines] == pytest.approx([g['val_acc'] for g in got], abs=1e-4)
    assert main(['run', str(toy), '-p', 'epochs', '1', '--out', str(tmp_path / 'q'), '--quiet']) == 0
    assert '  epoch ' not in capsys.readouterr().out
    grid = tmp_path / 'g.yaml'; grid.write_text('seed: [3]\n')
    assert main(['sweep', str(toy), str(grid), '--out', str(tmp_path / 's')]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if '  epoch ' in l]
    assert [l.split(': ', 1)[0][:7] for l in lines] == ['seed=3-'] * 2                 # the point's name first
    assert [l.split(': ', 1)[1].split('  ')[1:3] for l in lines] == [['epoch 1', 'step 25'], ['epoch 2', 'step 50']]


@pytest.fixture
def no_kernel(monkeypatch):
    "papermill.execute_notebook replaced: a test fails if a kernel would start."
    import papermill
    started = []
    def boom(*a, **k): started.append(a); raise AssertionError('a kernel was started')
    monkeypatch.setattr(papermill, 'execute_notebook', boom)
    return started


@pytest.mark.parametrize('argv,arg,hint', [
    (['run', 'multi_teacher', '-p', 'recipes', 'kd,mgdaub'], '`recipes`', "Did you mean 'mgda_ub'"),
    (['run', 'multi_teacher', '-p', 'recipes', '[kd, camkd, kii]'], '`recipes`', "Did you mean 'ki'"),
    (['run', 'multi_teacher', '-p', 'teachers', 'resnet_t,vit'], '`teachers`', "Did you mean 'vit_t'"),
    (['run', 'multi_teacher', '-p', 'recipe', 'kd'], '`params`', "Did you mean 'recipes'"),
    (['run', 'multi_teacher', '-p', 'epochs', 'ten'], '`epochs`', 'a number'),
    (['run', 'multi_teacher', '-p', 'device', 'gpu'], '`device`', 'cuda'),
    (['run', 'multi_teacher', '-p', 'primary', 'dkd', '-p', 'recipes', 'kd,ki'], '`primary`', 'recipes run'),
    (['run', 'single_teacher', '-p', 'teacher', 'resnet'], '`teacher`', "Did you mean 'resnet_t'"),
    (['run', 'multi_techer'], '`template`', "Did you mean 'multi_teacher'"),
    (['compare', 'gradient_balancing', 'multi_teacher', '-m', 'recipes', 'dto'], '`recipes`', "Did you mean 'dto_kd'"),
    (['compare', 'gradient_balancing', 'multi_teacher', '--seeds', '0,x'], '`--seeds`', 'integers'),
])
def test_parameters_rejected_before_a_kernel_starts(argv, arg, hint, no_kernel, tmp_path, capsys):
    assert main(argv + ['--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert arg in err and hint in err, err
    assert not no_kernel and not (tmp_path / 'o').exists()


def test_sweep_grid_values_rejected_before_a_kernel_starts(no_kernel, tmp_path, capsys):
    grid = tmp_path / 'g.yaml'; grid.write_text('recipes: [[kd], [kd, cmkd]]\n')
    assert main(['sweep', 'multi_teacher', str(grid), '--out', str(tmp_path / 's')]) == 2
    err = capsys.readouterr().err
    assert '`recipes`' in err and "Did you mean 'camkd'" in err and not no_kernel and not (tmp_path / 's').exists()


def test_list_parameter_forms(toy, tmp_path):
    from kdnb.runs import check_params
    for form in ('kd,dkd', 'kd, dkd', '[kd, dkd]', "['kd', 'dkd']", '["kd", "dkd"]'):
        assert check_params('single_teacher', {'recipes': form})['recipes'] == ['kd', 'dkd'], form
    assert check_params('single_teacher', {'recipes': 'taid'})['recipes'] == ['taid']
    assert check_params('multi_teacher', {'teachers': 'vit_t'})['teachers'] == ['vit_t']


def test_bad_input_exit_2(toy, tmp_path, capsys):
    f = tmp_path / 'file'; f.write_text('x')
    for argv, arg in [(['run', 'no_such_template'], '`template`'), (['run', str(toy), '--out', str(f)], '`out_dir`'),
                      (['run', str(toy), '-p', 'epoch', '1'], '`params`'), (['report', str(tmp_path / 'none')], '`run_dir`'),
                      (['report', str(tmp_path)], '`sweep_dir`')]:
        assert main(argv) == 2, argv
        assert arg in capsys.readouterr().err


@pytest.fixture
def fake_teachers(monkeypatch):
    "Stand-in kdnb.teachers / kdnb.cache modules recording how the CLI calls them."
    calls = []
    teachers, cache = types.ModuleType('kdnb.teachers'), types.ModuleType('kdnb.cache')
    def train_teachers(names=None, seed=0, force=False, epochs=None):
        calls.append(('train', dict(names=names, seed=seed, force=force, epochs=epochs)))
        return {'resnet': {'arch': 'resnet10t', 'test_acc': 0.9}}
    def build_cache(path, teachers=None, topk=None, rebuild=False):
        calls.append(('cache', dict(path=path, teachers=teachers, topk=topk, rebuild=rebuild))); return 'cache ok'
    class TeacherCache:
        @classmethod
        def build(cls, float16=False):
            calls.append(('TeacherCache.build', dict(float16=float16))); return 'built by the class'
    teachers.train_teachers, teachers.TeacherCache, cache.build_cache = train_teachers, TeacherCache, build_cache
    monkeypatch.setitem(sys.modules, 'kdnb.teachers', teachers)
    monkeypatch.setitem(sys.modules, 'kdnb.cache', cache)
    return calls


def test_teachers_train_and_cache_build(fake_teachers, monkeypatch, capsys):
    assert main(['teachers', 'train', '-p', 'names', "['resnet', 'vit']", '-p', 'force', 'True', '-p', 'epochs', '3']) == 0
    assert fake_teachers[-1] == ('train', dict(names=['resnet', 'vit'], seed=0, force=True, epochs=3))
    assert 'resnet' in capsys.readouterr().out
    assert main(['cache', 'build', '-p', 'path', 'data/cache/x.kdc', '-p', 'topk', '5']) == 0
    assert fake_teachers[-1] == ('cache', dict(path='data/cache/x.kdc', teachers=None, topk=5, rebuild=False))
    assert 'cache ok' in capsys.readouterr().out
    assert main(['teachers', 'train', '-p', 'epoch', '3']) == 2          # unknown option, before anything runs
    assert "`-p`: got ['epoch']" in capsys.readouterr().err and len(fake_teachers) == 2
    assert main(['cache', 'build']) == 2                                 # a required option missing
    assert '`-p`' in capsys.readouterr().err and len(fake_teachers) == 2
    monkeypatch.setitem(sys.modules, 'kdnb.cache', None)                # no kdnb.cache: the next candidate
    assert main(['cache', 'build', '-p', 'float16', 'True']) == 0 and 'built by the class' in capsys.readouterr().out
    assert fake_teachers[-1] == ('TeacherCache.build', dict(float16=True))


def test_teachers_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'kdnb.teachers', None)             # importing it fails
    assert main(['teachers', 'train']) == 2 and 'kdnb.teachers:train_teachers' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, 'kdnb.cache', types.ModuleType('kdnb.cache'))      # present, without the function
    assert main(['cache', 'build']) == 2 and 'does not provide' in capsys.readouterr().err
