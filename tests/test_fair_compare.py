"""`kdnb compare` on the embedded data: the budget-matched baseline is planned for the budget it gets, so its learning-rate
schedule completes (its last step runs at the schedule's final learning rate), and it is not worse than the same baseline
at its own settings by more than the noise. Checked from the run's own parameters and steps with torch's OneCycleLR,
independently of what the template reports, and then against what it reports."""
import json, math
import pytest, torch
from kdnb.data import load_data
from kdnb.runs import main

TEACHERS = "['resnet_t', 'vit_t']"
COMMON = ['-m', 'recipes', "['dto_kd']", '-m', 'teachers', TEACHERS, '-m', 'epochs', '2', '-m', 'device', 'cpu',
          '-b', 'recipes', "['kd']", '-b', 'teachers', TEACHERS, '-b', 'epochs', '1', '-b', 'device', 'cpu']


def _onecycle_lrs(lr, total):
    "The learning rate of every step of a OneCycle schedule planned for `total` steps (what Distiller builds)."
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    s = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]['lr']); opt.step(); s.step()
    return out


@pytest.mark.timeout(400)
def test_compare_baseline_schedule_completes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('IN_TEST', raising=False)                 # the templates' smoke shrinking would override `epochs`
    data = load_data('digits', size=32, channels=1)
    n_train, n_test = len(data.splits['train']), len(data.splits['test'])
    out = tmp_path / 'cmp'
    for match in ('seconds', 'steps'):                           # the method and the own-settings baseline are reused
        assert main(['compare', 'gradient_balancing', 'multi_teacher', *COMMON, '--match', match, '--out', str(out)]) == 0
        printed = capsys.readouterr().out
        cmp = json.loads((out / 'compare.json').read_text())
        eq, own = cmp['baseline_equal'], cmp['baseline_default']
        p, steps = eq['params'], eq['compute']['steps']
        # the schedule the baseline was planned for, from its parameters (Distiller: epochs x steps per epoch, capped by
        # budget_steps; a budget in seconds does not enter the plan), and the steps it took
        planned = math.ceil(p['epochs'] * (n_train // p.get('batch_size', 64)))
        if p.get('budget_steps'): planned = min(planned, p['budget_steps'])
        assert steps == planned, (match, p, steps, planned)
        lrs = _onecycle_lrs(p.get('lr', 3e-3), planned)
        assert lrs[steps - 1] == pytest.approx(lrs[-1], rel=1e-9), (match, lrs[steps - 1], lrs[-1])
        # what the template reports about its schedule agrees
        sch = eq['schedule']
        assert sch['complete'] and sch['planned_steps'] == planned and sch['lr_last'] == pytest.approx(sch['lr_end'])
        assert sch['lr_end'] == pytest.approx(lrs[-1], rel=1e-6) and cmp['baseline_schedule_complete'] is True
        if match == 'steps': assert steps == cmp['method']['compute']['steps']
        else:     # the method trains twice as long at a dearer step: the baseline gets more steps than at its own settings
            assert p.get('budget_seconds') is None and steps > own['compute']['steps']
            assert 'wall clock: method' in printed and 'step time noise' in printed
        # not below its own-settings run by more than the noise (2 s.e. of a difference of two test accuracies)
        a, b = eq['test_acc'], own['test_acc']
        noise = math.sqrt(a * (1 - a) / n_test + b * (1 - b) / n_test)
        assert a >= b - 2 * noise, (match, a, b, noise)
        d = cmp['deltas']['baseline_equal_vs_default']
        assert d['se'] == pytest.approx(noise) and d['within_noise'] == (abs(a - b) <= 2 * noise)
        assert 'within the noise' in printed or 'beyond the noise' in printed
        assert f'baseline_equal_{match}: kd  epoch 1  step ' in printed                       # streamed while it ran
