"""The course in nbs/course/: every lesson and every solutions notebook executes under papermill at test size
(two at a time); in the solutions every checker passes, in the lessons every exercise is reached and reported
unanswered; every checker rejects a typical wrong answer with a hint."""
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import nbformat
import pytest
import torch
import torch.nn.functional as F
from kdnb.core import KdnbError
from kdnb.exercises import EXERCISES, check, lesson_exercises, progress

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / 'nbs' / 'course'
LESSONS = sorted(p for p in COURSE.glob('[0-9][0-9]_*.ipynb') if not p.name.startswith('00_'))
BIN = Path(sys.executable).parent

def _lesson_number(p: Path) -> int: return int(p.name[:2])

def test_course_layout():
    "Eight or more lessons, each with a solutions notebook, a `# Lesson N:` title, goals, a parameters cell, exercises."
    assert len(LESSONS) >= 8
    assert [_lesson_number(p) for p in LESSONS] == list(range(1, len(LESSONS) + 1))
    guide = (COURSE / '00_guide.ipynb')
    text = '\n'.join(c.source for c in nbformat.read(guide, as_version=4).cells)
    for p in LESSONS:
        n = _lesson_number(p)
        nb = nbformat.read(p, as_version=4)
        assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith(f'# Lesson {n}: '), p.name
        assert 'Learning goals' in nb.cells[0].source and 'Time:' in nb.cells[0].source, p.name
        assert sum('parameters' in c.metadata.get('tags', []) for c in nb.cells) == 1, p.name
        assert (COURSE / 'solutions' / p.name).exists(), p.name
        assert p.stem in text, f"the teachers' guide does not mention {p.stem}"
        src = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
        for ex in lesson_exercises(n): assert f"check('{ex}'" in src, f"{p.name} never checks exercise {ex}"

@pytest.mark.parametrize('lesson', LESSONS, ids=lambda p: p.stem)
def test_solutions_match_lesson(lesson):
    "The solutions notebook is the lesson with each exercise cell replaced by its solution (plus a final assert)."
    les = nbformat.read(lesson, as_version=4).cells
    sol = nbformat.read(COURSE / 'solutions' / lesson.name, as_version=4).cells
    strip = lambda cells, tag: [(c.cell_type, c.source) for c in cells[1:] if tag not in c.metadata.get('tags', [])]
    assert strip(les, 'exercise') == strip(sol, 'solution')[:-1]          # the solutions end with the 'assert_passed' prose
    n_ex = sum('exercise' in c.metadata.get('tags', []) for c in les)
    n_sol = sum('solution' in c.metadata.get('tags', []) for c in sol)
    assert n_ex >= 2 and n_sol == n_ex + 1
    assert sol[-1].source == f'assert_passed({_lesson_number(lesson)})'
    for c in les:
        if 'exercise' in c.metadata.get('tags', []):
            assert 'raise NotImplementedError' in c.source or '= None' in c.source, c.source   # a stub, not an answer

def _run(nb: Path, out: Path, log: Path):
    env = dict(os.environ, IN_TEST='1', OMP_NUM_THREADS='1', PYTHONHASHSEED='0', KDNB_EXERCISE_LOG=str(log))
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / 'papermill'), str(nb), str(out), '-p', 'small', 'True', '-k', 'python3', '--cwd', str(nb.parent),
                        '--no-progress-bar'], env=env, capture_output=True, text=True, timeout=600)
    return nb, r, time.perf_counter() - t0

def _verdicts(log: Path) -> list[dict]:
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

def test_course_notebooks_execute(tmp_path):
    "All lessons and solutions under papermill (small sizes), two at a time; solutions: every checker right."
    jobs = []
    for p in LESSONS:
        for kind, nb in (('lesson', p), ('solutions', COURSE / 'solutions' / p.name)):
            jobs.append((kind, p, nb, tmp_path / f'{kind}_{p.name}', tmp_path / f'{kind}_{p.stem}.jsonl'))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda j: _run(j[2], j[3], j[4]), jobs))
    print(f"\n{len(jobs)} course notebooks in {time.perf_counter() - t0:.1f} s: " +
          ', '.join(f"{nb.parent.name[:3]}/{nb.stem[:2]} {s:.1f}" for nb, _, s in results))
    for (kind, p, nb, out, log), (_, r, _) in zip(jobs, results):
        assert r.returncode == 0, f"{kind} {p.name} failed:\n{r.stderr[-3000:]}"
        n = _lesson_number(p)
        got = {}
        for v in _verdicts(log): got.setdefault(v['exercise'], []).append(v['status'])
        want = lesson_exercises(n)
        assert sorted(got) == want, (kind, p.name, sorted(got), want)
        if kind == 'solutions':
            assert all(s == ['right'] for s in got.values()), (p.name, got)
        else:                               # an unfilled lesson reaches every exercise and reports it unanswered
            assert all(s == ['unanswered'] for s in got.values()), (p.name, got)
            assert 'not answered yet' in out.read_text()

# ---- every checker rejects a typical wrong answer, with a hint -----------------------------------------------------
def _kd_no_t2(s, t, T):
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()

def _kd_reverse(s, t, T):
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    return T ** 2 * (ls.exp() * (ls - lt)).sum(-1).mean()

def _mgda_unclipped(g1, g2):
    d = g1 - g2; return float((g2 - g1) @ g2 / (d @ d))

def _iva_unnormalized(s, t, w, keep):
    m = torch.zeros_like(w).scatter(1, w.topk(keep, 1).indices, 1.0)
    return (w * m * ((s - t) ** 2).mean(-1)).sum(1).mean()

def _tpa_uniform(zs, zt, qs, qt):
    lps, lpt, lqs, lqt = [F.log_softmax(x, -1) for x in (zs, zt, qs, qt)]
    return ((lpt.exp() * (lpt - lps)).sum(-1) + (lqt.exp() * (lqt - lqs)).sum(-1).mean(-1)).mean()

CMP = dict(match='seconds', acc_delta_equal_compute=-0.05, acc_delta_default=0.03, overhead_ratio=3.0)

WRONG = {   # exercise: (wrong answer, context, words the hint or message must contain)
    '1.1': (lambda z, T: F.softmax(z, -1), {}, 'divide by T'),
    '1.2': (_kd_no_t2, {}, 'T²'),
    '1.3': (lambda y, eps, C: (1 - eps) * F.one_hot(y, C).float() + eps / (C - 1) * (1 - F.one_hot(y, C).float()), {}, 'eps / C'),
    '1.4': ('down', {}, 'uniform'),
    '2.1': (lambda z: (z - z.mean(-1, keepdim=True)) / z.std(-1, unbiased=False, keepdim=True), {}, 'biased std'),
    '2.2': (lambda t, y, T: F.softmax(t / T, -1).gather(1, y[:, None])[:, 0], {}, '1 - p_gt'),
    '2.3': (lambda s, z, t: (1 - t) * F.softmax(s, -1) + t * F.softmax(z, -1), {}, 'interpolates logits'),
    '2.4': (False, {}, 'z-score'),
    '3.1': (lambda s, t: (0.5 * (1 - F.cosine_similarity(s, t, dim=-1)) + 0.5 * F.mse_loss(s, t, reduction='none').mean(-1)).mean(), {}, 'MSE'),
    '3.2': (32 * 128 + 32 * 64, dict(student_dim=32, teacher_dims={'resnet_t': 128, 'vit_t': 64}), 'bias'),
    '4.1': (lambda feats: {k: float((f ** 2).mean()) for k, f in feats.items()}, {}, 'unnormalised'),
    '4.2': ('convnext_t', {}, 'E[f²]'),
    '4.3': ('l2', {}, 'width'),
    '5.1': (_mgda_unclipped, {}, 'clip'),
    '5.2': ({'sum / K', 'MGDA', 'DTO-KD'}, {}, 'corollary'),
    '5.3': ({'mgda': 1, 'mgda_ub': 1}, {}, 'one gradient per objective'),
    '6.1': (lambda sc, tau: F.softmax(sc / tau, 0), {}, 'over the batch (dim=0)'),
    '6.2': (lambda tl, w, T: F.softmax(sum(w[:, k, None] * z for k, z in enumerate(tl.values())) / T, -1), {}, 'mixed logits'),
    '6.3': ({'knn_hard': 2 / 3, 'oracle': 2 / 3}, {}, 'saves nothing'),
    '7.1': (_iva_unnormalized, {}, 'renormalize'),
    '7.2': (_tpa_uniform, {}, "teacher's p_t(i)"),
    '8.1': (lambda ms, mt, bt: ms * bt / mt, {}, 'inverted'),
    '8.2': (True, dict(cmp=CMP), 'acc_delta_equal_compute'),
}

MORE_WRONG = [   # further typical mistakes
    ('1.2', _kd_reverse, {}, 'wrong way'),
    ('1.2', lambda s, t, T: T ** 2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction='sum'), {}, 'summed over the batch'),
    ('6.1', lambda sc, tau: torch.exp(sc / tau), {}, 'unnormalised weights'),
    ('5.1', lambda g1, g2: 0.5, {}, 'plain average'),
    ('3.2', 6336 + 20470, dict(student_dim=32, teacher_dims={'resnet_t': 128, 'vit_t': 64}, student_params=20470), 'includes the student'),
    ('8.2', 'maybe', dict(cmp=CMP), 'True or False'),
]

def test_every_exercise_has_a_wrong_answer_case():
    assert sorted(WRONG) == sorted(EXERCISES)

@pytest.mark.parametrize('ex,answer,ctx,words', [(k, *v) for k, v in sorted(WRONG.items())] + MORE_WRONG,
                         ids=[k for k in sorted(WRONG)] + [f'{c[0]}-more{i}' for i, c in enumerate(MORE_WRONG)])
def test_checker_rejects_wrong_answer(ex, answer, ctx, words):
    v = check(ex, answer, quiet=True, **ctx)
    assert v.status == 'wrong' and not v.passed and v.hint, (ex, v)
    assert words in v.hint + v.message, (ex, words, str(v))
    assert progress(int(ex.split('.')[0]))[ex] == 'wrong'

def test_check_unanswered_error_and_bad_input():
    def stub(z, T): raise NotImplementedError
    assert check('1.1', stub, quiet=True).status == 'unanswered'
    assert check('1.1', None, quiet=True).status == 'unanswered'
    v = check('1.1', lambda z, T: z.nonexistent(), quiet=True)
    assert v.status == 'error' and 'AttributeError' in v.message
    v = check('1.1', lambda z, T: z.softmax(0)[:2], quiet=True)
    assert v.status == 'wrong' and 'shape' in v.message
    with pytest.raises(AssertionError, match='not answered'): check('1.1', None, strict=True, quiet=True)
    with pytest.raises(KdnbError) as e: check('0.1', None)
    assert '`id`' in str(e.value)
    with pytest.raises(KdnbError) as e: check('8.2', True)
    assert '`cmp`' in str(e.value)
