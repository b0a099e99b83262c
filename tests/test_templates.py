"Smoke papermill runs of the training templates (IN_TEST sizes, a few steps) and their parameter checks."
import json
import pytest
from report_checks import check_figures
from kdnb.core import KdnbError
from kdnb.runs import run

SMOKE = {
    'multi_teacher': dict(teachers=['resnet_t', 'vit_t'], recipes=['alone', 'kd', 'ki'], budget_steps=4, device='cpu'),
    'single_teacher': dict(recipes=['kd', 'dkd', 'taid'], budget_steps=4, device='cpu'),
    'gradient_balancing': dict(recipes=['kd', 'mgda_ub', 'dto_kd'], budget_steps=4, device='cpu'),
}

@pytest.mark.parametrize('template', sorted(SMOKE))
def test_template_smoke(template, tmp_path, monkeypatch):
    monkeypatch.setenv('IN_TEST', '1')
    m = run(template, SMOKE[template], tmp_path / template, progress=False)
    saved = json.loads((tmp_path / template / 'metrics.json').read_text())
    assert saved['template'] == template and saved['primary'] in SMOKE[template]['recipes']
    for r in SMOKE[template]['recipes']:
        assert 0 <= m[r]['test_acc'] <= 1 and m[r]['compute']['steps'] == 4, r
        assert (tmp_path / template / r / 'log.jsonl').exists()
    teachers = [k for k in m if k.startswith('teacher:')]
    assert teachers and all(m[k]['test_acc'] > 0.9 for k in teachers)       # the committed zoo checkpoints
    assert (tmp_path / template / f'{template}.html').exists()
    figs = check_figures(tmp_path / template / f'{template}.ipynb', tmp_path / template / f'{template}.html')
    if template == 'multi_teacher':            # the magnitude panel shows the teachers, measured, beside the students
        names = [n for f in figs for t in f['data'] if t.get('name') == 'magnitude' for n in t['x']]
        assert {'teacher resnet_t', 'teacher vit_t'} <= set(names) and any(n.startswith('student (') for n in names), names
    if template == 'gradient_balancing':
        assert m['mgda_ub']['backward_per_step'] == 1 and 'corollary1_share' in m['dto_kd']


@pytest.mark.parametrize('template,params,arg', [
    ('multi_teacher', dict(recipes=['kd', 'magic']), '`recipes`'),
    ('multi_teacher', dict(teachers=['nobody']), '`teachers`'),
    ('single_teacher', dict(teacher='nobody'), '`teacher`'),
    ('multi_teacher', dict(recipez=['kd']), '`params`'),
])
def test_template_bad_parameters(template, params, arg, tmp_path, monkeypatch):
    monkeypatch.setenv('IN_TEST', '1')
    with pytest.raises(KdnbError) as e: run(template, params, tmp_path / 'r', progress=False)
    assert arg in str(e.value)
