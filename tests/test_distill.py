"The training loop end to end: kill-and-resume equality and a 2-process gloo DDP run."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from conftest import ROOT, BIN

JOB = str(ROOT / 'tests' / 'distill_job.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')

def _run(args, **kw):
    r = subprocess.run([sys.executable, JOB, *args], env=ENV, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, r.stderr[-3000:]

def _result(d): return json.loads((Path(d) / 'result.json').read_text())

def test_resume_after_kill_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    _run([str(full), '--dropout', '0.1'])            # 3 epochs of 19 steps; the first checkpoint comes at step 2
    p = subprocess.Popen([sys.executable, JOB, str(killed), '--dropout', '0.1'], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, t0 = killed / 'checkpoint.pt', time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.002)
    assert p.poll() is None, 'the job finished before it could be killed'
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (killed / 'result.json').exists()
    step_at_kill = torch.load(ckpt, weights_only=False)['compute']['steps']
    _run([str(killed), '--dropout', '0.1', '--resume'])
    a, b = _result(full), _result(killed)
    assert 0 < step_at_kill < a['compute']['steps']
    assert b['compute']['steps'] == a['compute']['steps'] and b['compute']['samples'] == a['compute']['samples']
    for k in ('test_acc', 'best_val_acc', 'last_val_acc', 'best_test_acc', 'test_ece'): assert b[k] == a[k], k
    sa, sb = torch.load(full / 'student.pt'), torch.load(killed / 'student.pt')
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la = [json.loads(l) for l in (full / 'log.jsonl').read_text().splitlines()]
    lb = [json.loads(l) for l in (killed / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in lb] == [r['step'] for r in la]       # no duplicated or lost log records
    assert [r['loss'] for r in lb] == [r['loss'] for r in la]


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    _run([str(single), '--epochs', '2', '--ckpt-every', '0'])
    r = subprocess.run([str(BIN / 'torchrun'), '--nproc_per_node=2', '--master_port=29517', JOB, str(ddp), '--epochs', '2', '--ckpt-every', '0'],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _result(single), _result(ddp)
    assert a['compute']['steps'] * 64 == a['compute']['samples'] == b['compute']['samples']
    sa, sb = torch.load(single / 'student.pt'), torch.load(ddp / 'student.pt')
    for k in sa: torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
    assert abs(a['test_acc'] - b['test_acc']) <= 1 / 270 + 1e-9      # at most one test sample may flip


def test_cached_augmented_views_reach_the_student(tmp_path):
    "With a cache of stored views (CED), the student trains on exactly the view the teachers scored, with no teacher forward."
    from kdnb.data import load_data, TensorLoader
    from kdnb.teachers import TeacherBank
    from kdnb.cache import build_cache
    from kdnb.models import create_model
    from kdnb.distill import Distiller, TeacherSource, kd_objectives
    data = load_data('digits')
    bank = TeacherBank.from_zoo(['resnet_t'], data, train=False)
    cache = build_cache(bank, data, path=tmp_path / 'c.kdc', splits=['train'], views=2, dtype='float32', progress=False)
    src = TeacherSource(cache)
    x, y, idx = next(iter(TensorLoader(data, 'train', 32)))
    src.set_epoch(1)
    xv = src.view(x, idx)
    assert torch.equal(xv, cache.augment(x, idx, view=1)) and not torch.equal(xv, x)
    torch.testing.assert_close(src(xv, idx)['resnet_t'].logits, bank(xv)['resnet_t'].logits, rtol=1e-3, atol=1e-3)
    d = Distiller(create_model('resnet_s', 10, 1), cache, data, kd_objectives(['resnet_t']), epochs=1, budget_steps=3, progress=False)
    d.fit()
    assert d.compute.steps == 3 and d.summary()['compute']['teacher_forwards'] == 0
