"""Routers end to end on the embedded digits data, plus property tests of the routing primitives."""
import math
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

from kdnb.core import KdnbError
from kdnb.data import load_data
from kdnb.routing import (ROUTERS, MODES, make_router, check_route_inputs, teacher_quality, per_sample_kd, mix_targets,
                          weights_from_scores, KNNRouter, PLRouter, RLRouter, GateRouter, ClassifierRouter,
                          pl_nll, pl_sample, rankings_from_quality, routing_accuracy, dispatch)

GROUPS = [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]          # teacher k is trained on these classes only
TEACHERS = [f"t{k}" for k in range(len(GROUPS))]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Tiny tensors: one intra-op thread is much faster on a shared CPU."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def digits():
    "300 train / 120 val digits (8x8, flattened), three class-specialist teachers, a fixed random-projection encoder."
    d = load_data('digits', size=8)
    def part(split, n):
        idx = torch.as_tensor(d.splits[split][:n])
        return d.normalize(d.images[idx]).flatten(1), d.labels[idx]
    xtr, ytr = part('train', 300)
    xva, yva = part('val', 120)
    torch.manual_seed(0)
    teachers = {}
    for name, group in zip(TEACHERS, GROUPS):
        m = torch.isin(ytr, torch.tensor(group))
        t = nn.Linear(64, 10)
        opt = torch.optim.Adam(t.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad(); F.cross_entropy(t(xtr[m]), ytr[m]).backward(); opt.step()
        teachers[name] = t.eval().requires_grad_(False)
    enc = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) / 8
    expert = lambda y: torch.tensor([next(k for k, g in enumerate(GROUPS) if int(c) in g) for c in y])
    return dict(xtr=xtr, ytr=ytr, xva=xva, yva=yva, teachers=teachers, enc=enc, expert_va=expert(yva))


class Student(nn.Module):
    def __init__(self):
        super().__init__(); self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU()); self.head = nn.Linear(32, 10)
    def forward(self, x):
        e = self.body(x); return e, self.head(e)


def build(name, mode, dg):
    "A router in `mode`, fitted offline on the encoder embedding where it learns from quality signals."
    kw = dict(mode=mode)
    if name in ('gate', 'rl'): return make_router(name, TEACHERS, dim=32, **kw)
    if name == 'classifier': kw['epochs'] = 20
    r = make_router(name, TEACHERS, **kw)
    if name in ('knn', 'pl', 'classifier'):
        with torch.no_grad(): zt = {t: m(dg['xtr']) for t, m in dg['teachers'].items()}
        r.fit(dg['xtr'] @ dg['enc'], teacher_quality(zt, dg['ytr'], TEACHERS))
    return r


def run_routed(router, dg, epochs=2, bs=50, T=2.0):
    "Routed multi-teacher KD: CE + router-weighted per-sample KD; returns the weight log and the student."
    torch.manual_seed(0)
    student = Student()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    log = []
    for ep in range(epochs):
        router.train()
        perm = torch.randperm(len(dg['ytr']), generator=torch.Generator().manual_seed(ep))
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            x, y = dg['xtr'][idx], dg['ytr'][idx]
            with torch.no_grad(): zt = {t: m(x) for t, m in dg['teachers'].items()}
            emb, s = student(x)
            route_emb = emb if router.name in ('gate', 'rl') else x @ dg['enc']
            ce = F.cross_entropy(s, y, reduction='none')
            total, weights = router(per_sample_kd(s, zt, T), embedding=route_emb, teacher_logits=zt, labels=y)
            opt.zero_grad(); (ce.mean() + total).backward(); opt.step(); router.step()
            if router.name == 'rl':
                with torch.no_grad(): after = F.cross_entropy(student(x)[1], y, reduction='none')
                router.reward(ce.detach() - after)
            log.append({k: v.clone() for k, v in weights.items()})
    return log, student


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', ['uniform', 'oracle', 'knn', 'pl', 'classifier', 'gate', 'rl'])
def test_router_runs_end_to_end_on_digits(name, mode, digits):
    router = build(name, mode, digits)
    log, student = run_routed(router, digits)
    n_batches = 2 * math.ceil(300 / 50)
    assert len(log) == n_batches and router.cost.calls == n_batches and router.cost.samples == 600
    for w in log:                                              # logged weights: per-sample teacher distributions
        W = torch.stack([w[t] for t in TEACHERS], 1)
        assert W.shape == (50, 3) and torch.isfinite(W).all() and (W >= 0).all()
        assert torch.allclose(W.sum(1), torch.ones(50), atol=1e-5)
        if mode == 'hard': assert ((W == 0) | (W == 1)).all()
    c = router.cost.as_dict()
    assert c['route_s'] > 0 and 0 <= c['saved_fraction'] < 1
    if mode == 'hard' and not router.reads_teachers:
        assert c['saved_fraction'] == pytest.approx(2 / 3)
    if name == 'oracle': assert c['saved_fraction'] == 0
    with torch.no_grad():
        acc = (student(digits['xva'])[1].argmax(1) == digits['yva']).float().mean()
    assert acc > 0.3      # learned in 2 epochs (chance 0.1; online gate/RL start from random routing and lag the rest)
    router.eval()
    emb = student(digits['xva'])[0].detach() if name in ('gate', 'rl') else digits['xva'] @ digits['enc']
    with torch.no_grad(): zt = {t: m(digits['xva']) for t, m in digits['teachers'].items()}
    w, info = router.route(emb, teacher_logits=zt, labels=digits['yva'])
    assert w.shape == (120, 3) and set(info) >= {'choice', 'scores', 'route_s', 'teacher_forwards', 'saved_fraction'}


def test_learned_routers_beat_chance_on_digits(digits):
    "kNN, PL and classifier routers trained on teacher losses route held-out digits to the right specialist."
    emb = digits['xva'] @ digits['enc']
    for name in ('knn', 'pl', 'classifier'):
        w, _ = build(name, 'hard', digits).route(emb)
        assert routing_accuracy(w, digits['expert_va']) > 0.6, name


def test_routed_target_beats_uniform_on_digits(digits):
    with torch.no_grad(): zt = {t: m(digits['xva']) for t, m in digits['teachers'].items()}
    w, _ = build('knn', 'hard', digits).route(digits['xva'] @ digits['enc'])
    acc = lambda p: (p.argmax(1) == digits['yva']).float().mean()
    assert acc(mix_targets(zt, w, TEACHERS)) > acc(mix_targets(zt, torch.full((120, 3), 1 / 3), TEACHERS))


# ---- properties -------------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 20), K=st.integers(1, 6), tau=st.floats(0.05, 10), scale=st.floats(0.1, 100), seed=st.integers(0, 10**6))
def test_weights_are_distributions_and_hard_is_one_hot(B, K, tau, scale, seed):
    s = torch.randn(B, K, generator=torch.Generator().manual_seed(seed)) * scale
    w = weights_from_scores(s, 'soft', tau)
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(B), atol=1e-5)
    h = weights_from_scores(s, 'hard')
    assert ((h == 0) | (h == 1)).all() and (h.sum(1) == 1).all() and (h.argmax(1) == s.argmax(1)).all()
    p = weights_from_scores(s, 'soft', tau, prune=0.3)
    assert torch.allclose(p.sum(1), torch.ones(B), atol=1e-5) and ((p == 0) | (p >= 0.3 * 0.999) | (p == p.max(1, keepdim=True).values)).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(2, 5), best=st.integers(0, 4), k=st.integers(1, 8), metric=st.sampled_from(['cosine', 'euclidean']),
       agg=st.sampled_from(['mean', 'vote']), mode=st.sampled_from(MODES), seed=st.integers(0, 10**6))
def test_knn_picks_best_teacher_when_neighbours_agree(K, best, k, metric, agg, mode, seed):
    best = best % K
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(40, 6, generator=g)
    q = torch.rand(40, K, generator=g) + 1.0
    q[:, best] = torch.rand(40, generator=g) * 0.5        # the best teacher on every bank entry
    r = KNNRouter([f"t{i}" for i in range(K)], k=k, metric=metric, agg=agg, mode=mode).fit(bank, q)
    w, _ = r.route(torch.randn(9, 6, generator=g))
    assert (w.argmax(1) == best).all()


def test_knn_local_agreement_beats_global_winner():
    "Neighbours decide: a teacher that is best only near the query wins there."
    bank = torch.cat([torch.randn(30, 2) * 0.1 + torch.tensor([5., 0.]), torch.randn(30, 2) * 0.1 + torch.tensor([-5., 0.])])
    q = torch.ones(60, 2); q[:30, 0] = 0.1; q[30:, 1] = 0.1
    r = KNNRouter(['a', 'b'], k=5, metric='euclidean').fit(bank, q)
    w, _ = r.route(torch.tensor([[5., 0.1], [-5., -0.1]]))
    assert w.argmax(1).tolist() == [0, 1]


@settings(max_examples=6, deadline=None)
@given(K=st.integers(2, 6), seed=st.integers(0, 10**6))
def test_pl_mle_recovers_known_worths(K, seed):
    g = torch.Generator().manual_seed(seed)
    worths = torch.randn(K, generator=g)
    rk = pl_sample(worths, 5000, g)
    r = PLRouter([f"t{i}" for i in range(K)], per_sample=False).fit(rankings=rk)
    assert torch.allclose(r.bias.detach(), worths - worths.mean(), atol=0.15)


def test_pl_nll_matches_brute_force_probability():
    "The PL likelihood of each of the 3! rankings sums to 1."
    s = torch.tensor([0.3, -1.0, 2.0])
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    probs = torch.stack([torch.exp(-pl_nll(s, p[None])) for p in perms])
    assert torch.isclose(probs.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.isclose(probs[4] + probs[5], s.softmax(0)[2], atol=1e-5)    # P(teacher 2 first)


def test_rankings_from_quality_best_first():
    assert rankings_from_quality(torch.tensor([[0.5, 0.1, 0.9]])).tolist() == [[1, 0, 2]]


def test_dispatch_lists_samples_per_teacher():
    w = weights_from_scores(torch.tensor([[0., 1.], [2., 1.], [0., 3.]]), 'hard')
    assert {k: v.tolist() for k, v in dispatch(w, ['a', 'b']).items()} == {'a': [1], 'b': [0, 2]}


def test_gate_receives_kd_gradient_and_balance_fights_collapse():
    torch.manual_seed(0)
    gate = GateRouter(['a', 'b', 'c'], dim=4, balance=1.0)
    x = torch.randn(64, 4)
    for _ in range(100):                                    # teacher a always has the lowest loss ...
        losses = {'a': torch.full((64,), 0.1), 'b': torch.full((64,), 1.0), 'c': torch.full((64,), 1.0)}
        total, _ = gate(losses, embedding=x); total.backward(); gate.step()
    w_bal, _ = gate.route(x)
    gate0 = GateRouter(['a', 'b', 'c'], dim=4, balance=0.0)
    for _ in range(100):
        losses = {'a': torch.full((64,), 0.1), 'b': torch.full((64,), 1.0), 'c': torch.full((64,), 1.0)}
        total, _ = gate0(losses, embedding=x); total.backward(); gate0.step()
    w_free, _ = gate0.route(x)
    assert w_free[:, 0].mean() > 0.95                       # ... so the KD loss alone collapses the gate onto a
    assert w_bal[:, 0].mean() < w_free[:, 0].mean() - 0.2   # and load balancing keeps the others in play


def test_rl_learns_a_bandit():
    rl = RLRouter(['a', 'b', 'c'], dim=3, lr=0.1)
    for _ in range(60):
        w, _ = rl.route(torch.randn(32, 3)); rl.reward(w[:, 1])
    w, _ = rl.eval().route(torch.randn(50, 3))
    assert w[:, 1].mean() > 0.9


# ---- bad input: every check names its argument ---------------------------------------------------------------

def _raises(fn, arg):
    with pytest.raises(KdnbError, match=f"`{arg}`"): fn()


def test_unknown_router_name_lists_valid_ones():
    with pytest.raises(KdnbError) as e: make_router('nearest', TEACHERS)
    for n in ROUTERS: assert n in str(e.value)


def test_input_validation():
    zl = {t: torch.randn(4, 10) for t in TEACHERS}
    emb, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    _raises(lambda: make_router('knn', []), 'teachers')                                        # K = 0
    _raises(lambda: check_route_inputs(TEACHERS, teacher_logits={}), 'teacher_logits')         # K = 0 logits
    _raises(lambda: check_route_inputs(TEACHERS, emb, zl, y[:3]), 'labels')                      # batch mismatch
    _raises(lambda: check_route_inputs(TEACHERS, torch.randn(5, 8), zl), 'teacher_logits')
    _raises(lambda: check_route_inputs(TEACHERS, emb, quality=torch.rand(3, 3)), 'quality')
    _raises(lambda: check_route_inputs(TEACHERS, teacher_logits={**zl, 't1': torch.randn(4, 9)}), 'teacher_logits')
    _raises(lambda: check_route_inputs(TEACHERS, emb, dim=16), 'embedding')                     # wrong dim
    _raises(lambda: check_route_inputs(TEACHERS, emb.clone().fill_(float('nan'))), 'embedding')  # NaN
    _raises(lambda: check_route_inputs(TEACHERS, teacher_logits={**zl, 't0': zl['t0'] / 0 * 0}), 'teacher_logits')
    _raises(lambda: check_route_inputs(TEACHERS, quality=torch.tensor([[0., float('nan'), 1.]])), 'quality')
    _raises(lambda: check_route_inputs(TEACHERS, emb, zl, torch.tensor([0, 1, 2, 10])), 'labels')
    _raises(lambda: check_route_inputs(TEACHERS, quality=torch.rand(4, 2)), 'quality')          # wrong K
    knn = KNNRouter(TEACHERS)
    _raises(lambda: knn.route(emb), 'router')                                                   # not fitted
    knn.fit(emb, torch.rand(4, 3))
    _raises(lambda: knn.route(torch.randn(2, 5)), 'embedding')
    _raises(lambda: make_router('knn', TEACHERS, mode='top1'), 'mode')
    _raises(lambda: make_router('gate', TEACHERS, dim=4, top_k=5), 'top_k')
    _raises(lambda: make_router('classifier', TEACHERS, target='x'), 'target')
    gate = make_router('gate', TEACHERS, dim=8)
    _raises(lambda: gate({'t0': torch.rand(4)}, embedding=emb), 'losses')
    rl = make_router('rl', TEACHERS, dim=8)
    _raises(lambda: rl.reward(1.0), 'reward')
    rl.route(emb)
    _raises(lambda: rl.reward(torch.tensor([1., float('nan'), 0., 0.])), 'reward')
    _raises(lambda: per_sample_kd(torch.randn(4, 7), zl), 'student_logits')
    _raises(lambda: mix_targets(zl, torch.ones(4, 3), TEACHERS), 'weights')
    _raises(lambda: PLRouter(TEACHERS).fit(emb), 'quality')


def test_pl_online_observe_learns_global_worths():
    g = torch.Generator().manual_seed(3)
    worths = torch.tensor([1.0, 0.0, -1.0])
    rk = pl_sample(worths, 64 * 200, g)
    r = PLRouter(['a', 'b', 'c'], per_sample=False, lr=0.05)
    for i in range(200): r.observe(rankings=rk[64 * i:64 * (i + 1)])
    b = r.bias.detach()
    assert torch.allclose(b - b.mean(), worths, atol=0.25) and r.cost.update_s > 0


def test_router_as_balancer_weighs_teachers_and_passes_other_terms():
    r = make_router('uniform', ['a', 'b'], mode='soft')
    losses = {'a': torch.tensor([1., 3.]), 'b': torch.tensor([2., 2.]), 'task': torch.tensor(0.5)}
    total, w = r(losses, labels=torch.tensor([0, 1]))
    assert torch.isclose(total, torch.tensor(0.5 * 2.0 + 0.5 * 2.0 + 0.5))
    assert set(w) == {'a', 'b', 'task'} and float(w['task']) == 1.0 and torch.allclose(w['a'], torch.full((2,), 0.5))


def test_building_a_router_leaves_the_global_rng_alone():
    torch.manual_seed(123); a = torch.rand(3)
    torch.manual_seed(123); GateRouter(['a', 'b'], dim=4, seed=5); RLRouter(['a', 'b'], dim=4, seed=5)
    ClassifierRouter(['a', 'b'], epochs=1).fit(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.rand(8, 2, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.rand(3), a)


def test_every_remaining_check_names_its_argument():
    from kdnb.routing import expert_problem, check_rankings, check_weights, UniformRouter
    T2 = ['a', 'b']
    cases = [
        (lambda: make_router('uniform', ['a', 3]), 'teachers'),
        (lambda: make_router('uniform', T2, prune=1.0), 'prune'),
        (lambda: make_router('uniform', T2, dim=0), 'dim'),
        (lambda: make_router('uniform', T2).route(), 'embedding'),                       # nothing to size the batch
        (lambda: make_router('knn', T2, metric='l1'), 'metric'),
        (lambda: make_router('knn', T2, agg='max'), 'agg'),
        (lambda: make_router('knn', T2, bank_size=0), 'bank_size'),
        (lambda: make_router('pl', T2, top=0), 'top'),
        (lambda: make_router('pl', T2, steps=0), 'steps'),
        (lambda: make_router('classifier', T2, hidden=-1), 'hidden'),
        (lambda: make_router('classifier', T2, target_tau=0), 'target_tau'),
        (lambda: make_router('gate', T2, dim=4, balance_kind='entropy'), 'balance_kind'),
        (lambda: make_router('gate', T2, dim=4, balance=-1), 'balance'),
        (lambda: make_router('gate', T2, dim=4, label_weight=-1), 'label_weight'),
        (lambda: make_router('rl', T2, dim=4, baseline_momentum=1.0), 'baseline_momentum'),
        (lambda: make_router('rl', T2, dim=0), 'dim'),
        (lambda: expert_problem(n=0), 'n'),
        (lambda: expert_problem(distract=2.0), 'distract'),
        (lambda: check_rankings(torch.tensor([[0., 1.]]), 2), 'rankings'),
        (lambda: check_rankings(torch.tensor([[0, 1, 2]]), 2), 'rankings'),
        (lambda: check_weights(torch.ones(3, 2) / 2, 2, 2), 'weights'),
        (lambda: check_weights(torch.tensor([[1.5, -0.5]]), 1, 2), 'weights'),
        (lambda: check_route_inputs(T2, embedding=torch.randn(3)), 'embedding'),
        (lambda: check_route_inputs(T2, teacher_logits=[torch.randn(2, 3)]), 'teacher_logits'),
        (lambda: check_route_inputs(T2, teacher_logits={'a': torch.randn(2, 3), 'b': torch.ones(2, 3, dtype=torch.long)}), 'teacher_logits'),
        (lambda: check_route_inputs(T2, labels=torch.tensor([0.5, 1.0])), 'labels'),
        (lambda: check_route_inputs(T2, quality=torch.ones(2, 2, dtype=torch.long)), 'quality'),
    ]
    for fn, arg in cases: _raises(fn, arg)
    gate = make_router('gate', T2, dim=4, label_weight=1.0)
    _raises(lambda: gate({'a': torch.rand(3), 'b': torch.rand(3)}, embedding=torch.randn(3, 4)), 'labels')
    rl = make_router('rl', T2, dim=4)
    with torch.no_grad(): rl.route(torch.randn(3, 4))
    _raises(lambda: rl.reward(torch.zeros(3)), 'reward')                                 # sampled without gradients
