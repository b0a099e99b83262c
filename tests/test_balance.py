"""Balancing and MGDA: the min-norm solver against scipy, boundary and degenerate cases, bad input,
corollary properties (hypothesis), and a tiny two-teacher KD run on the digits with every balancer
and every combiner."""
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, assume, note, strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize, nnls

from kdnb.core import KdnbError, seed_everything
from kdnb.balance import (BALANCERS, make_balancer, weighted_total, summarize_weights, EntropyBalance,
                          min_norm_solution, min_norm_from_gram, gram_matrix, gradient_diagnostics,
                          COMBINERS, make_combiner, MGDA, MGDAUB, DTOKD, WeightedSum)
from kdnb.mgda import dto_kd_weights

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models: one intra-op thread avoids oversubscription on a shared CPU (restored afterwards)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- independent solvers ------------------------------------------------------------------------

def slsqp_weights(G):
    "Min-norm convex weights by SLSQP on the simplex (scipy), on the Gram matrix scaled to unit max diagonal."
    K = len(G); Gs = G / max(np.diag(G).max(), 1e-300)
    best = None
    for x0 in [np.full(K, 1 / K)] + [np.eye(K)[i] for i in range(K)]:
        r = minimize(lambda a: a @ Gs @ a, x0, jac=lambda a: 2 * Gs @ a, method='SLSQP', bounds=[(0, 1)] * K,
                     constraints=[{'type': 'eq', 'fun': lambda a: a.sum() - 1, 'jac': lambda a: np.ones(K)}],
                     options={'ftol': 1e-16, 'maxiter': 2000})
        if best is None or r.fun < best.fun: best = r
    return np.clip(best.x, 0, None) / np.clip(best.x, 0, None).sum()

def nnls_point(M, rho=1e4):
    "Min-norm point of the hull by scipy's NNLS with the sum-to-one constraint as a heavily weighted row."
    s = np.abs(M).max()
    A = np.vstack([M.T / s, rho * np.ones((1, len(M)))]); b = np.concatenate([np.zeros(M.shape[1]), [rho]])
    w = nnls(A, b, maxiter=10_000)[0]; w /= w.sum()
    return w @ M


# --- acceptance: matches independent solvers for K = 2..8 -------------------------------------------

@pytest.mark.parametrize('K', range(2, 9))
def test_min_norm_matches_scipy_nondegenerate(K):
    rng = np.random.default_rng(K)
    for trial in range(8):
        P = K + rng.integers(1, 3 * K)
        M = rng.normal(size=(K, P)) * rng.uniform(0.1, 10, size=(K, 1)) + rng.normal(size=P) * rng.uniform(0, 3)
        a = min_norm_solution(torch.from_numpy(M)).numpy()
        assert a.dtype == np.float64 and abs(a.sum() - 1) < 1e-12 and (a >= 0).all()
        ref = slsqp_weights(M @ M.T)
        assert np.abs(a - ref).max() < 1e-4, (K, trial, a, ref)
        assert np.abs(a @ M - nnls_point(M)).max() < 1e-4 * np.abs(M).max()

@pytest.mark.parametrize('K', range(2, 9))
def test_min_norm_matches_scipy_degenerate(K):
    "Fewer dimensions than gradients, duplicates, collinear points: weights are not unique, the min-norm point is."
    rng = np.random.default_rng(100 + K)
    for trial in range(6):
        P = int(rng.integers(1, K))
        M = rng.normal(size=(K, P)) + rng.normal(size=P) * rng.uniform(0, 2)
        if trial % 2: M[-1] = M[0]                                  # a duplicate gradient
        a = min_norm_solution(torch.from_numpy(M)).numpy()
        G = M @ M.T
        ref = slsqp_weights(G)
        scale = np.diag(G).max()
        assert a @ G @ a <= ref @ G @ ref + 1e-8 * scale
        assert np.abs(a @ M - nnls_point(M)).max() < 1e-4 * np.abs(M).max()

def test_boundary_cases_exact():
    assert min_norm_solution(torch.tensor([[1., 0], [1, 1]])).tolist() == [1.0, 0.0]
    assert min_norm_solution(torch.tensor([[1., 1], [1, 0]])).tolist() == [0.0, 1.0]
    assert min_norm_solution(torch.tensor([[1., 0], [1, 1], [3, 3]])).tolist() == [1.0, 0.0, 0.0]
    assert min_norm_solution([torch.tensor([2., 0, 0]), torch.tensor([2., 1, 0]), torch.tensor([2., 0, 1]), torch.tensor([5., 5, 5])]).tolist() == [1.0, 0.0, 0.0, 0.0]

@pytest.mark.parametrize('grads, expect_norm', [
    ([[0., 0], [0, 0]], 0.0), ([[0., 0], [1, 1]], 0.0), ([[1., 2], [2, 4]], math.sqrt(5)),           # zero, parallel
    ([[1., 0], [-1, 0]], 0.0), ([[1., 0], [-5, 0]], 0.0), ([[1e-30, 0], [-1e-30, 0]], 0.0),           # antiparallel
    ([[1e20, 0], [0, 1e20]], 1e20 / math.sqrt(2)), ([[3., 4], [3, 4], [3, 4]], 5.0),                  # scale, identical
    ([[1., 0], [-1, 0], [0, 1]], 0.0)])
def test_degenerate_gradients_no_nan(grads, expect_norm):
    g = torch.tensor(grads, dtype=torch.float64)
    a = min_norm_solution(g)
    assert torch.isfinite(a).all() and abs(a.sum().item() - 1) < 1e-12 and (a >= 0).all()
    assert abs((a @ g).norm().item() - expect_norm) <= 1e-9 * max(1.0, expect_norm)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize('bad, fragment', [
    ([], 'K=0'), (torch.zeros(0, 4), 'K=0'), ([torch.zeros(3), torch.zeros(4)], 'equal length'),
    (torch.tensor([[1., float('nan')], [0, 1]]), 'NaN'), ([torch.ones(2), torch.tensor([float('inf'), 0])], 'NaN/inf'),
    (torch.zeros(4), '(K, P)'), ('grads', '(K, P)'), ([torch.zeros(2), 'x'], 'tensors')])
def test_min_norm_bad_input(bad, fragment):
    with pytest.raises(KdnbError) as e: min_norm_solution(bad)
    assert '`grads`' in str(e.value) and fragment in str(e.value)

def test_unknown_names():
    with pytest.raises(KdnbError, match='`name`'): make_balancer('softmax_everything')
    with pytest.raises(KdnbError, match='`name`'): make_combiner('pcgrad')
    with pytest.raises(KdnbError, match='camkd'): make_balancer('bogus')       # the message lists valid names

def test_combiner_bad_input():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(KdnbError, match='`losses`'): MGDA().backward([], shared_params=[w])
    with pytest.raises(KdnbError, match='`losses`'): MGDA().backward([w.sum(), w], shared_params=[w])     # not scalar
    with pytest.raises(KdnbError, match='`shared_params`'): MGDA().backward([w.sum(), (2 * w).sum()])
    with pytest.raises(KdnbError, match='`shared_repr`'): MGDAUB().backward([w.sum(), (2 * w).sum()])
    with pytest.raises(KdnbError, match='`weights`'): WeightedSum([1.0]).backward([w.sum(), (2 * w).sum()])


# --- corollaries as properties (hypothesis) ------------------------------------------------------

grad_mats = st.integers(2, 6).flatmap(lambda K: st.integers(1, 8).flatmap(lambda P: hnp.arrays(
    np.float64, (K, P), elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32))))

@SETTINGS
@given(grad_mats)
def test_kkt_and_upper_bound_always(M):
    "Optimality (KKT) always holds, and |g*| <= min_i |g_i| (MGDA's upper bound, corollary 4)."
    G = M @ M.T
    a = min_norm_from_gram(G)
    scale = max(np.diag(G).max(), 1e-30)
    assert abs(a.sum() - 1) < 1e-9 and (a >= 0).all()
    v, f = G @ a, a @ G @ a
    assert v.min() >= f - 1e-7 * scale                                 # no vertex improves the objective
    d = gradient_diagnostics(G, a)
    assert d['norm_d'] <= d['min_grad_norm'] + 1e-6 * math.sqrt(scale)
    interior = (a > 1e-6).all() and d['norm_d'] > 1e-4 * math.sqrt(scale)
    note(f"interior={interior}")
    if interior:                                                        # corollaries 1 and 2 whenever interior
        assert d['corollary1']
        assert np.allclose(d['inner'], f, rtol=0, atol=1e-6 * scale)

@st.composite
def interior_problems(draw):
    "Gradients g_i = c + v_i with sum_i lam_i v_i = 0 and v_i orthogonal to c: the min-norm point is c, weights lam (interior)."
    K = draw(st.integers(2, 6)); P = draw(st.integers(K, K + 6))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    lam = rng.dirichlet(np.ones(K) * 2) * 0.9 + 0.1 / K
    c = rng.normal(size=P) * draw(st.floats(0.1, 10))
    V = rng.normal(size=(K, P)) * draw(st.floats(0.1, 10))
    V -= np.outer(V @ c / (c @ c), c)                                  # orthogonal to c
    V -= lam @ V                                                        # lam-weighted mean zero
    return c + V, lam, c

@SETTINGS
@given(interior_problems())
def test_corollaries_1_and_2_interior(prob):
    M, lam, c = prob
    a = min_norm_solution(torch.from_numpy(M)).numpy()
    assert np.abs(a - lam).max() < 1e-6
    d = gradient_diagnostics(M @ M.T, a)
    assert d['corollary1'] and min(d['inner']) > 0                      # 1: positive component along every g_i
    assert d['inner_gap'] < 1e-8                                        # 2: <g*, g_i> all equal (= |g*|^2)
    assert abs(d['norm_d'] - np.linalg.norm(c)) < 1e-8 * np.linalg.norm(c)

@SETTINGS
@given(grad_mats)
def test_dto_kd_bounds(M):
    "Our DTO-KD reading: whenever not stationary, min|g_i| <= |d| <= max|g_i|, <d, g_i> > 0 and equal projections."
    G = M @ M.T
    norms = np.sqrt(np.diag(G))
    assume(norms.min() > 1e-3 * max(norms.max(), 1e-12))
    w, a, stationary = dto_kd_weights(G)
    d = gradient_diagnostics(G, w)
    u = math.sqrt(max(float((a / norms) @ G @ (a / norms)), 0))
    if not stationary and u > 1e-4:
        assert d['min_grad_norm'] * (1 - 1e-7) <= d['norm_d'] <= d['max_grad_norm'] * (1 + 1e-7)
        if (a > 1e-6).all():
            assert d['corollary1'] and d['component_gap'] < 1e-6

@pytest.mark.parametrize('deg', [90, 150, 170, 179, 179.9])
def test_lower_bound_fails_for_mgda_not_dto(deg):
    """Plain min-norm MGDA has no lower bound: |g*| = |g1||g2| sin(t)/|g1 - g2| -> 0 as the gradients turn
    antiparallel; the DTO-KD rescaling keeps |d| >= min|g_i| until they are exactly antiparallel."""
    t = math.radians(deg)
    M = np.array([[1.0, 0.0], [2 * math.cos(t), 2 * math.sin(t)]])
    G = M @ M.T
    d_mgda = gradient_diagnostics(G, min_norm_from_gram(G))
    expected = 2 * math.sin(t) / np.linalg.norm(M[0] - M[1])
    assert abs(d_mgda['norm_d'] - expected) < 1e-9
    w, _, stationary = dto_kd_weights(G)
    d_dto = gradient_diagnostics(G, w)
    assert not stationary and d_dto['lower_ratio'] >= 1 - 1e-9 and d_dto['corollary1']
    if deg >= 179: assert d_mgda['lower_ratio'] < 0.02                # the step all but vanishes

def test_exactly_antiparallel_is_stationary():
    G = gram_matrix(torch.tensor([[1., 0], [-2, 0]]))
    assert gradient_diagnostics(G, min_norm_from_gram(G))['norm_d'] < 1e-12      # MGDA: g* = 0 (to rounding), no NaN
    w, a, stationary = dto_kd_weights(G)
    assert stationary and (w == 0).all() and np.isfinite(a).all()
    w, _, _ = dto_kd_weights(G, on_stationary='mean')
    assert np.allclose(w, 0.5)


# --- combiners on a real graph ------------------------------------------------------------------

def _toy(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 3) for _ in range(3)])
    x = torch.randn(16, 6); tg = [torch.randn(16, 3) * (i + 1) for i in range(3)]
    def losses():
        f = body(x)
        return [(h(f) - t).pow(2).mean() for h, t in zip(heads, tg)], f
    return body, heads, losses

@pytest.mark.parametrize('name', ['mgda', 'dto_kd'])
def test_exact_combiners_set_the_combination(name):
    body, heads, losses = _toy()
    comb = make_combiner(name, **({'approx': False} if name == 'dto_kd' else {}))
    L, f = losses()
    diag = comb.backward(L, shared_params=list(body.parameters()))
    L2, _ = losses()
    want = sum(w * torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, list(body.parameters()), retain_graph=True)])
               for w, l in zip(diag['weights'], L2))
    got = torch.cat([p.grad.reshape(-1) for p in body.parameters()])
    assert torch.allclose(got, want, atol=1e-6)
    assert all(p.grad is not None for p in heads.parameters())
    assert diag['n_backward'] == 4 and diag['corollary1']

def test_mgda_ub_one_backbone_pass_and_weights_from_features():
    body, heads, losses = _toy()
    L, f = losses()
    diag = MGDAUB().backward(L, shared_repr=f)
    assert diag['n_backbone_backward'] == 1
    L2, f2 = losses()
    gz = torch.stack([torch.autograd.grad(l, f2, retain_graph=True)[0].reshape(-1) for l in L2])
    assert np.allclose(diag['weights'], min_norm_solution(gz).numpy(), atol=1e-6)


# --- balancers: the contract ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 4), st.integers(1, 16), st.integers(0, 10_000))
def test_every_balancer_reports_the_weights_it_used(K, B, seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(K)]
    losses = {n: torch.rand(B, generator=g) * 3 for n in names}
    ctx = dict(teacher_logits={n: torch.randn(B, 5, generator=g) * 3 for n in names}, labels=torch.randint(0, 5, (B,), generator=g),
               student_logits=torch.randn(B, 5, generator=g))
    for name in BALANCERS:
        total, w = make_balancer(name)(losses, **ctx)
        assert set(w) == set(names)
        assert torch.allclose(total, weighted_total(losses, w), atol=1e-6)
        assert all(math.isfinite(v) and v >= 0 for v in summarize_weights(w).values())


# --- end to end: a tiny two-teacher KD run on the digits -------------------------------------------

class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)
    def forward(self, x):
        f = self.backbone(x); return self.fc(f), f

@pytest.fixture(scope='module')
def digits_kd():
    "Digits train/val tensors and two small MLP teachers of different strengths (trained here, in a second)."
    from kdnb.data import load_data
    data = load_data('digits')
    x, y, _ = data.split('train'); xv, yv, _ = data.split('val')
    x, xv = F.avg_pool2d(x, 2), F.avg_pool2d(xv, 2)                   # 16x16 is plenty for 8x8 digits
    teachers, hidden = {}, {'wide': 64, 'narrow': 12}
    for i, (name, h) in enumerate(hidden.items()):
        torch.manual_seed(i)
        t = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, h), nn.ReLU(), nn.Linear(h, 10))
        opt = torch.optim.Adam(t.parameters(), 3e-3)
        for step in range(120 if name == 'wide' else 40):
            idx = torch.randint(0, len(x), (128,))
            opt.zero_grad(); F.cross_entropy(t(x[idx]), y[idx]).backward(); opt.step()
        teachers[name] = t.eval()
    with torch.no_grad():
        logits = {n: t(x) for n, t in teachers.items()}
        feats = {n: t[:3](x) for n, t in teachers.items()}
    acc = {n: (t(xv).argmax(1) == yv).float().mean().item() for n, t in teachers.items()}
    return dict(x=x, y=y, xv=xv, yv=yv, logits=logits, feats=feats, hidden=hidden, teacher_acc=acc)

def kd_per_sample(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction='none', log_target=True).sum(-1) * T * T

def _run(d, balancer=None, combiner=None, steps=30, seed=0):
    from kdnb.projectors import DistillHeads
    seed_everything(seed)
    student = Student()
    heads = DistillHeads(d['hidden'], student_dim=32, kind='mlp', norm='standardize')
    opt = torch.optim.Adam(list(student.parameters()) + list(heads.parameters()), 5e-3)
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps):
        idx = torch.randint(0, len(d['x']), (64,), generator=g)
        x, y = d['x'][idx], d['y'][idx]
        tl = {n: z[idx] for n, z in d['logits'].items()}
        logits, f = student(x)
        pairs = heads(f, {n: z[idx] for n, z in d['feats'].items()})
        T = {n: (balancer.temperature(n) if isinstance(balancer, EntropyBalance) else 4.0) for n in tl}
        kd = {n: kd_per_sample(logits, tl[n], T[n]) + 0.5 * (pairs[n][0] - pairs[n][1]).pow(2).mean(-1) for n in tl}
        task = F.cross_entropy(logits, y)
        opt.zero_grad()
        if balancer is not None:
            total, w = balancer(kd, teacher_logits=tl, labels=y, student_logits=logits.detach())
            (task + total).backward()
            entry = dict(loss=float((task + total).detach()), **{f"w/{k}": v for k, v in summarize_weights(w).items()})
        else:
            diag = combiner.backward({'task': task, **{n: v.mean() for n, v in kd.items()}},
                                     shared_params=list(student.backbone.parameters()), shared_repr=f,
                                     other_params=list(student.fc.parameters()) + [p for p in heads.parameters() if p.requires_grad])
            entry = dict(loss=float((task + sum(v.mean() for v in kd.values())).detach()), **{f"w/{k}": w for k, w in zip(diag['names'], diag['weights'])},
                         n_backward=diag['n_backward'], cos_12=diag.get('cos_12'))
        opt.step()
        log.append(entry)
    with torch.no_grad(): acc = (student(d['xv'])[0].argmax(1) == d['yv']).float().mean().item()
    return log, acc

def _check_log(log, names):
    for e in log:
        assert {f"w/{n}" for n in names} <= set(e) and all(math.isfinite(e[f"w/{n}"]) for n in names)
    first, last = np.mean([e['loss'] for e in log[:5]]), np.mean([e['loss'] for e in log[-5:]])
    assert last < first, (first, last)

def test_teachers_are_useful(digits_kd):
    assert digits_kd['teacher_acc']['wide'] > 0.8 and digits_kd['teacher_acc']['narrow'] > 0.5

@pytest.mark.parametrize('name', sorted(BALANCERS))
def test_kd_run_with_each_balancer(digits_kd, name):
    log, acc = _run(digits_kd, balancer=make_balancer(name, **({'lr': 0.05} if name == 'entropy' else {})))
    _check_log(log, ['wide', 'narrow'])
    assert acc > 0.3, acc                                              # chance is 0.1
    if name == 'lowest_loss': assert any(e['w/wide'] < 1 or e['w/narrow'] < 1 for e in log)

@pytest.mark.parametrize('name', sorted(COMBINERS))
def test_kd_run_with_each_combiner(digits_kd, name):
    comb = make_combiner(name, **({'diag_every': 1} if name == 'weighted_sum' else {}))
    log, acc = _run(digits_kd, combiner=comb)
    _check_log(log, ['task', 'wide', 'narrow'])
    assert acc > 0.3, acc
    assert all(e['cos_12'] is not None and -1 - 1e-9 <= e['cos_12'] <= 1 + 1e-9 for e in log)
    assert {e['n_backward'] for e in log} == ({1} if name == 'weighted_sum' else {4})


def test_projected_gradient_fallback_matches(monkeypatch):
    "The safety net (FISTA + KKT polish) alone also reaches the optimum, on nondegenerate and degenerate problems."
    import kdnb.mgda as m
    monkeypatch.setattr(m, '_wolfe', lambda G, tol, max_iter: (np.full(len(G), 1 / len(G)), False))
    rng = np.random.default_rng(7)
    for K, P in [(3, 10), (5, 12), (8, 30), (4, 2), (6, 1)]:
        M = rng.normal(size=(K, P)) + rng.normal(size=P)
        G = M @ M.T
        a, ref = m.min_norm_from_gram(G), slsqp_weights(G)
        assert a @ G @ a <= ref @ G @ ref + 1e-8 * np.diag(G).max()
        if P >= K: assert np.abs(a - ref).max() < 1e-4
