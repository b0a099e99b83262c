"Property-based checks of the feature and relational losses against independent float64 numpy computations."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kdnb.core import KdnbError
from kdnb.losses.feature import (FEATURE_LOSSES, class_centers, cos_sl1_loss, cprd_loss, fitnet_loss, hcl_loss, nd_loss,
                                 rkd_angle_loss, rkd_distance_loss, rkd_loss, trg_context_loss, trg_graph_loss, trg_loss, unic_loss)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def rng(seed): return np.random.default_rng(seed)


# --- HCL: adaptive average pooling written out with its bin rule (start = floor(i*H/l), end = ceil((i+1)*H/l)) ---
def np_adaptive_pool(x, l):
    n, c, h, w = x.shape
    out = np.zeros((n, c, l, l))
    for i in range(l):
        h0, h1 = (i * h) // l, -((-(i + 1) * h) // l)
        for j in range(l):
            w0, w1 = (j * w) // l, -((-(j + 1) * w) // l)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out

def np_hcl(S, T):
    total = 0.0
    for s, t in zip(S, T):
        h = s.shape[2]
        terms, weights, w = [((s - t) ** 2).mean()], [1.0], 1.0
        for l in (4, 2, 1):
            if l >= h: continue
            w /= 2
            terms.append(((np_adaptive_pool(s, l) - np_adaptive_pool(t, l)) ** 2).mean()); weights.append(w)
        total += float(np.dot(terms, weights) / sum(weights))
    return total

@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 13), st.integers(1, 13)), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1), st.sampled_from([1e-2, 1.0, 30.0]))
def test_hcl_matches_formula_any_shape(shapes, seed, scale):
    r = rng(seed)
    n = shapes[0][0]
    S = [r.normal(size=(n, c, h, w)) * scale for _, c, h, w in shapes]
    T = [r.normal(size=(n, c, h, w)) * scale + 0.5 for _, c, h, w in shapes]
    got = hcl_loss([torch.tensor(x, dtype=torch.float32) for x in S], [torch.tensor(x, dtype=torch.float32) for x in T]).item()
    want = np_hcl(S, T)
    assert got == pytest.approx(want, rel=1e-4)

def test_hcl_gradient_only_to_student():
    s = [torch.randn(2, 3, 8, 8, requires_grad=True)]; t = [torch.randn(2, 3, 8, 8, requires_grad=True)]
    hcl_loss(s, t).backward()
    assert s[0].grad is not None and t[0].grad is None


# --- UNIC / DUNE ---
def np_smooth_l1(d, beta=1.0):
    a = np.abs(d); return np.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta)

def np_cos(s, t):
    return (s * t).sum(-1) / np.maximum(np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1), 1e-8)

@SETTINGS
@given(st.integers(1, 5), st.integers(1, 7), st.integers(2, 9), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_unic_matches_formula(b, n, d, seed, w_cos):
    r = rng(seed)
    cs, ct, ps, pt = r.normal(size=(b, d)), r.normal(size=(b, d)) * 2, r.normal(size=(b, n, d)), r.normal(size=(b, n, d)) * 2
    per = lambda s, t: w_cos * (1 - np_cos(s, t)) + (1 - w_cos) * np_smooth_l1(s - t).mean(-1)
    want = ((per(cs, ct) + per(ps, pt).mean(1)) / 2).mean()
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    got = unic_loss(f(cs), f(ct), f(ps), f(pt), w_cos=w_cos, w_sl1=1 - w_cos).item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


# --- ND: the per-sample loop of the paper's formula ---
@SETTINGS
@given(st.integers(1, 12), st.integers(2, 10), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_nd_matches_per_sample_loop(b, d, c, seed):
    r = rng(seed)
    s, t, y = r.normal(size=(b, d)), r.normal(size=(b, d)) * 3, r.integers(0, c, b)
    centers = r.normal(size=(c, d))
    want = np.mean([1 - s[i] @ (centers[y[i]] / np.linalg.norm(centers[y[i]])) / max(np.linalg.norm(s[i]), np.linalg.norm(t[i]))
                    for i in range(b)])
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    got = nd_loss(f(s), f(t), torch.tensor(y), f(centers)).item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)

def test_class_centers_are_class_means():
    t, y = torch.randn(50, 4), torch.randint(0, 5, (50,))
    c = class_centers(t, y, 6)
    for k in range(5):
        if (y == k).any(): assert torch.allclose(c[k], t[y == k].mean(0), atol=1e-6)
    assert torch.equal(c[5], torch.zeros(4))                  # a class without samples gets a zero centre


# --- RKD: similarity transforms of the student leave both terms unchanged ---
@SETTINGS
@given(st.integers(3, 10), st.integers(2, 8), st.integers(2, 8), st.floats(0.01, 100.0), st.integers(0, 2**31 - 1))
def test_rkd_similarity_invariance(b, ds, dt, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, ds, generator=g, dtype=torch.float64), torch.randn(b, dt, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(ds, ds, generator=g, dtype=torch.float64))
    moved = (scale * s @ q + torch.randn(1, ds, generator=g, dtype=torch.float64)).float()
    for fn in (rkd_distance_loss, rkd_angle_loss):
        assert fn(moved, t.float()).item() == pytest.approx(fn(s.float(), t.float()).item(), rel=2e-3, abs=1e-5)

def test_rkd_no_gradient_to_teacher():
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    rkd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


# --- TRG ---
@SETTINGS
@given(st.integers(1, 4), st.integers(2, 8), st.integers(2, 10), st.integers(0, 2**31 - 1), st.floats(0.05, 2.0))
def test_trg_invariant_to_rotation_and_token_scaling(b, n, d, seed, tau):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, n, d, generator=g), torch.randn(b, n, d + 3, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    moved = s @ q * (torch.rand(b, n, 1, generator=g) * 10 + 0.1)
    if b * n >= 2:
        assert trg_graph_loss(moved, t, tau).item() == pytest.approx(trg_graph_loss(s, t, tau).item(), rel=1e-3, abs=1e-5)
    assert trg_context_loss(moved, t, tau).item() == pytest.approx(trg_context_loss(s, t, tau).item(), rel=1e-3, abs=1e-5)

def test_trg_matches_explicit_kl():
    s, t = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    def graph(x, tau):
        x = F.normalize(x, dim=-1); m = x @ x.T / tau
        return torch.stack([torch.cat([m[i, :i], m[i, i + 1:]]) for i in range(len(x))])
    def kl(a, b): pa, pb = a.softmax(-1), b.softmax(-1); return (pa * (pa.log() - pb.log())).sum(-1).mean()
    want_graph = kl(graph(t.reshape(10, 4), 0.1), graph(s.reshape(10, 3), 0.1))
    want_ctx = (kl(graph(t[0], 0.1), graph(s[0], 0.1)) + kl(graph(t[1], 0.1), graph(s[1], 0.1))) / 2
    assert trg_graph_loss(s.float(), t.float()).item() == pytest.approx(want_graph.item(), rel=1e-4)
    assert trg_context_loss(s.float(), t.float()).item() == pytest.approx(want_ctx.item(), rel=1e-4)
    assert trg_loss(s.float(), t.float(), w_graph=0.5, w_context=2.0).item() == pytest.approx(0.5 * want_graph.item() + 2 * want_ctx.item(), rel=1e-4)


# --- CPRD ---
def np_cprd(s, t, pos, k, tau, mine):
    out = []
    for i in range(len(s)):
        negs = [j for j in range(s.shape[1]) if pos is None or j != pos[i]]
        src = s[i] if mine == 'student' else t[i]
        hard = sorted(negs, key=lambda j: -src[j])[:k]
        ranked = sorted(hard, key=lambda j: -t[i, j])
        z = np.array([s[i, j] / tau for j in ranked])
        out.append(np.mean([np.log(np.exp(z[r:] - z[r:].max()).sum()) + z[r:].max() - z[r] for r in range(k - 1)]))
    return float(np.mean(out))

@SETTINGS
@given(st.integers(1, 6), st.integers(4, 20), st.integers(0, 2**31 - 1), st.sampled_from(['student', 'teacher']),
       st.booleans(), st.floats(0.02, 2.0))
def test_cprd_matches_plackett_luce_on_hard_negatives(b, n, seed, mine, with_pos, tau):
    r = rng(seed)
    s, t = r.permutation(b * n).reshape(b, n) / n + r.normal(size=(b, n)) * 1e-3, r.permutation(b * n).reshape(b, n) * 1.0
    pos = r.integers(0, n, b) if with_pos else None
    k = min(5, n - 1)
    got = cprd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                    None if pos is None else torch.tensor(pos), num_hard=k, tau=tau, mine=mine).item()
    assert got == pytest.approx(np_cprd(s.astype(np.float32).astype(np.float64), t, pos, k, tau, mine), rel=1e-3, abs=1e-5)

@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_cprd_only_teacher_order_matters(seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    base = cprd_loss(s, t, num_hard=6)
    for f in (lambda x: 3 * x + 1, torch.exp, lambda x: x ** 3, torch.sigmoid):
        assert cprd_loss(s, f(t), num_hard=6).item() == pytest.approx(base.item(), rel=1e-6)


# --- every loss: registered, and checks that raise KdnbError (a ValueError) naming the argument ---
def test_registry_names():
    assert set(FEATURE_LOSSES) == {'fitnet', 'cos_sl1', 'unic', 'nd', 'rkd', 'rkd_distance', 'rkd_angle', 'hcl',
                                   'trg', 'trg_graph', 'trg_context', 'cprd'}
    with pytest.raises(KdnbError, match='`loss`'): FEATURE_LOSSES['nope']

@pytest.mark.parametrize('fn,args,arg', [
    (fitnet_loss, (torch.zeros(2, 3), torch.zeros(2, 4)), 'teacher'),
    (fitnet_loss, (np.zeros((2, 3)), torch.zeros(2, 3)), 'student'),
    (cos_sl1_loss, (torch.zeros(2, 3), torch.full((2, 3), float('nan'))), 'teacher'),
    (rkd_loss, (torch.zeros(1, 3), torch.zeros(1, 3)), 'student'),
    (hcl_loss, ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]), 'teacher_feats'),
    (trg_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 4, 4)), 'teacher_tokens'),
    (cprd_loss, (torch.zeros(2, 3), torch.zeros(2, 3)), 'num_hard'),
])
def test_bad_input_raises_named_error(fn, args, arg):
    with pytest.raises(ValueError, match=f'`{arg}'): fn(*args)
