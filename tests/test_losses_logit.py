"Property-based conformance checks of the logit losses against float64 numpy formulas (random shapes, scales, temperatures)."
import inspect, math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import kdnb.losses as L
from kdnb.core import KdnbError

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def np_softmax(z):
    z = z - z.max(-1, keepdims=True); e = np.exp(z); return e / e.sum(-1, keepdims=True)

def np_standardize(z):
    return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))

def np_kd(s, t, T, standardize=False):
    if standardize: s, t = np_standardize(s), np_standardize(t)
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    return (pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * T ** 2

def np_dkd(s, t, y, alpha, beta, T):
    B, C = s.shape; gt = np.zeros((B, C)); gt[np.arange(B), y] = 1
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1); bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() * T ** 2 / B
    qs, qt = np_softmax(s / T - 1000 * gt), np_softmax(t / T - 1000 * gt)
    with np.errstate(divide='ignore', invalid='ignore'):
        nckd = np.where(qt > 0, qt * (np.log(qt) - np.log(qs)), 0.0).sum() * T ** 2 / B
    return alpha * tckd + beta * nckd

def np_taid(s, t, tt):
    p = np_softmax((1 - tt) * s + tt * t)
    return -(p * np.log(np_softmax(s))).sum(-1).mean()


batches = st.tuples(st.integers(1, 8), st.integers(2, 24), st.floats(0.1, 20.0), st.integers(0, 2**31 - 1))
temps = st.floats(0.5, 8.0)

def make(B, C, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * scale, torch.randn(B, C, generator=g) * scale, torch.randint(0, C, (B,), generator=g)

def close(a, b, rtol=1e-4, atol=1e-6): assert abs(a - b) <= atol + rtol * abs(b), (a, b)


def test_public_signatures():
    "The five reference functions exist under kdnb.losses with the issue's signatures and defaults."
    sig = lambda f: {k: v.default for k, v in inspect.signature(f).parameters.items()}
    assert sig(L.kd_loss) == {'student_logits': inspect._empty, 'teacher_logits': inspect._empty, 'T': 4.0, 'standardize': False}
    assert list(sig(L.standardize_logits))[0] == 'z'
    assert sig(L.dkd_loss) == {'student_logits': inspect._empty, 'teacher_logits': inspect._empty, 'target': inspect._empty,
                               'alpha': 1.0, 'beta': 8.0, 'T': 4.0, 'standardize': False}
    assert list(sig(L.taid_loss))[:3] == ['student_logits', 'teacher_logits', 't']
    assert L.TAIDSchedule(10).t == 0.4
    for name in ('kd', 'ls_kd', 'dkd', 'taid', 'fkl', 'rkl', 'js', 'tv', 'sinkhorn', 'pld', 'mt_kd'): assert name in L.LOSSES


@SETTINGS
@given(batches, temps, st.booleans())
def test_kd_matches_formula(b, T, standardize):
    s, t, _ = make(*b)
    close(L.kd_loss(s, t, T, standardize).item(), np_kd(s.double().numpy(), t.double().numpy(), T, standardize))


@SETTINGS
@given(batches, temps, st.floats(0.0, 4.0), st.floats(0.0, 16.0))
def test_dkd_matches_mdistiller_recipe(b, T, alpha, beta):
    s, t, y = make(*b)
    if s.shape[1] < 2: return
    ref = np_dkd(s.double().numpy(), t.double().numpy(), y.numpy(), alpha, beta, T)
    close(L.dkd_loss(s, t, y, alpha, beta, T).item(), ref, atol=1e-5)


@SETTINGS
@given(batches, temps)
def test_kd_is_tckd_plus_weighted_nckd(b, T):
    "Per sample, KD = TCKD + (1 - p_t[gt]) NCKD (Zhao et al., CVPR 2022, eq. 3-5)."
    s, t, y = make(*b)
    for i in range(s.shape[0]):
        si, ti, yi = s[i:i+1], t[i:i+1], y[i:i+1]
        p = F.softmax(ti.double() / T, -1)[0, yi].item()
        close(L.kd_loss(si, ti, T).item(), (L.tckd_loss(si, ti, yi, T) + (1 - p) * L.nckd_loss(si, ti, yi, T)).item(), atol=1e-5)


@SETTINGS
@given(batches, st.floats(-50, 50), st.floats(0.05, 20))
def test_ls_kd_invariant_to_shift_and_scale(b, shift, scale):
    s, t, y = make(*b)
    if s.shape[1] < 3: return
    ref = L.kd_loss(s, t, 2.0, standardize=True).item()
    close(L.kd_loss(s * scale + shift, t, 2.0, standardize=True).item(), ref, rtol=1e-3, atol=1e-4)
    close(L.dkd_loss(s, t * scale - shift, y, standardize=True).item(), L.dkd_loss(s, t, y, standardize=True).item(), rtol=1e-3, atol=1e-4)


@SETTINGS
@given(batches, st.floats(0.0, 1.0))
def test_taid_matches_formula(b, tt):
    s, t, _ = make(*b)
    close(L.taid_loss(s, t, tt).item(), np_taid(s.double().numpy(), t.double().numpy(), tt))


@SETTINGS
@given(batches, st.sampled_from(L.DIVERGENCE_KINDS))
def test_divergences_nonnegative_and_zero_on_equal(b, kind):
    s, t, _ = make(*b)
    assert L.divergence(s, t, kind).item() >= -1e-6
    assert abs(L.divergence(s, s.clone(), kind).item()) < 1e-5


def test_value_checks_can_be_turned_off():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    bad = t.clone(); bad[0, 0] = float('nan')
    with pytest.raises(KdnbError, match='`teacher_logits`'): L.kd_loss(s, bad)
    L.value_checks(False)
    try: assert math.isnan(L.kd_loss(s, bad).item())
    finally: L.value_checks(True)
