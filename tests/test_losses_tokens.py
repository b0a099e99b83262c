"Heavier checks of the Align-TI token losses: Monte Carlo unbiasedness with many draws, cost probes, IVA properties."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdnb.core import KdnbError
from kdnb.losses.tokens import (TOKEN_LOSSES, head_transition, instruction_attention, instruction_relevance, iva_loss,
                                iva_weights, select_iva_layer, tpa_loss_exact, tpa_loss_mc)

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def np_log_softmax(z): z = z - z.max(-1, keepdims=True); return z - np.log(np.exp(z).sum(-1, keepdims=True))

def np_tpa(zs, zt, qs, qt, mask=None):
    "Joint KL over all V x V pairs of consecutive tokens, loops over positions, float64."
    b, l, v = zs.shape
    vals = []
    for i in range(b):
        for j in range(l):
            if mask is not None and not mask[i, j]: continue
            js = np_log_softmax(zs[i, j])[:, None] + np_log_softmax(qs[i, j])
            jt = np_log_softmax(zt[i, j])[:, None] + np_log_softmax(qt[i, j])
            vals.append((np.exp(jt) * (jt - js)).sum())
    return float(np.mean(vals))

@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 9), st.integers(0, 2**31 - 1), st.sampled_from([0.1, 1.0, 5.0]))
def test_tpa_exact_matches_joint_kl(b, l, v, seed, scale):
    r = np.random.default_rng(seed)
    zs, zt, qs, qt = (r.normal(size=sh) * scale for sh in [(b, l, v), (b, l, v), (b, l, v, v), (b, l, v, v)])
    mask = r.random((b, l)) < 0.7; mask[0, 0] = True
    f = lambda x: torch.tensor(x, dtype=torch.float32)
    got = tpa_loss_exact(f(zs), f(zt), f(qs), f(qt), mask=torch.tensor(mask)).item()
    assert got == pytest.approx(np_tpa(zs, zt, qs, qt, mask), rel=1e-4, abs=1e-6)

def many_draws(zs, zt, qs, qt, S, n, seed):
    rep = lambda x: x.repeat(n, *[1] * (x.dim() - 1))
    per = tpa_loss_mc(rep(zs), rep(zt), rep(qs), rep(qt), num_samples=S, reduction='none',
                      generator=torch.Generator().manual_seed(seed))
    return per.reshape(n, -1).mean(1)

@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(3, 40), st.sampled_from([1, 3, 16]), st.integers(0, 2**31 - 1))
def test_tpa_mc_unbiased(b, l, v, S, seed):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(b, l, v, generator=g) * 2, torch.randn(b, l, v, generator=g) * 2
    qs, qt = torch.randn(b, l, v, v, generator=g) * 2, torch.randn(b, l, v, v, generator=g) * 2
    exact = tpa_loss_exact(zs, zt, qs, qt).item()
    d = many_draws(zs, zt, qs, qt, S, 20000, seed)
    se = d.std().item() / math.sqrt(len(d))
    assert abs(d.mean().item() - exact) < 4.5 * se + 1e-6, (exact, d.mean().item(), se)

def test_mc_with_all_mass_on_one_token_is_exact():
    "A one-hot teacher at every position leaves nothing to sample: the estimate equals the exact value."
    b, l, v = 2, 3, 7
    zt = torch.full((b, l, v), -1e4); zt[..., 2] = 1e4
    zs, qs, qt = torch.randn(b, l, v), torch.randn(b, l, v, v), torch.randn(b, l, v, v)
    assert tpa_loss_mc(zs, zt, qs, qt, num_samples=3).item() == pytest.approx(tpa_loss_exact(zs, zt, qs, qt).item(), rel=1e-5)

def test_mc_gradient_matches_exact_in_expectation():
    "The gradient of the estimator is unbiased too (teacher-side sampling carries no gradient)."
    g = torch.Generator().manual_seed(0)
    b, l, v, n = 1, 2, 6, 20000
    zs, zt = torch.randn(b, l, v, generator=g), torch.randn(b, l, v, generator=g)
    qs, qt = torch.randn(b, l, v, v, generator=g), torch.randn(b, l, v, v, generator=g)
    qs_e = qs.clone().requires_grad_(); tpa_loss_exact(zs, zt, qs_e, qt).backward()
    qs_m = qs.repeat(n, 1, 1, 1).requires_grad_()
    tpa_loss_mc(zs.repeat(n, 1, 1), zt.repeat(n, 1, 1), qs_m, qt.repeat(n, 1, 1, 1), num_samples=2,
                generator=torch.Generator().manual_seed(1)).backward()
    mean_grad = qs_m.grad.reshape(n, b, l, v, v).sum(0)          # loss was averaged over n copies: sum = mean per copy
    assert torch.allclose(mean_grad, qs_e.grad, atol=2e-3), (mean_grad - qs_e.grad).abs().max()


class LargestTensor(TorchDispatchMode):
    def __init__(self): super().__init__(); self.largest = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor): self.largest = max(self.largest, o.numel())
        return out

@pytest.mark.parametrize('V,S', [(4096, 2), (4096, 8), (16384, 4)])
def test_mc_never_builds_v_squared(V, S):
    b, l, d = 1, 3, 8
    hid_s, hid_t = torch.randn(b, l, d), torch.randn(b, l, d)
    emb, hs, ht = torch.nn.Embedding(V, d), torch.nn.Linear(d, V), torch.nn.Linear(d, V)
    zs, zt = torch.randn(b, l, V, requires_grad=True), torch.randn(b, l, V)
    with LargestTensor() as probe:
        tpa_loss_mc(zs, zt, head_transition(hid_s, emb, hs), head_transition(hid_t, emb, ht), num_samples=S).backward()
    assert probe.largest <= max(b * l * S * V, V * d), probe.largest       # one V-row per sample (or a head's weight)
    assert probe.largest < V * V / 100


def test_exact_callable_and_table_agree():
    b, l, v, d = 2, 3, 11, 5
    hid, emb, head = torch.randn(b, l, d), torch.randn(v, d), torch.nn.Linear(d, v)
    tr = head_transition(hid, emb, head)
    table = head(hid[:, :, None, :] + emb[None, None])
    zs, zt, qt = torch.randn(b, l, v), torch.randn(b, l, v), torch.randn(b, l, v, v)
    assert tpa_loss_exact(zs, zt, tr, qt).item() == pytest.approx(tpa_loss_exact(zs, zt, table, qt).item(), rel=1e-5)


# --- IVA ---
@SETTINGS
@given(st.integers(1, 4), st.integers(1, 30), st.integers(1, 8), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_iva_keep_ratio_selects_ceil_and_ignores_the_rest(b, nv, d, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    s, t, w = torch.randn(b, nv, d, generator=g), torch.randn(b, nv, d, generator=g), torch.rand(b, nv, generator=g) + 1e-3
    k = max(1, math.ceil(ratio * nv - 1e-9))
    top = w.topk(k, 1).indices
    ww = torch.zeros_like(w).scatter(1, top, w.gather(1, top)); ww = ww / ww.sum(1, keepdim=True)
    want = (ww * ((s - t) ** 2).mean(-1)).sum(1).mean()
    assert iva_loss(s, t, w, keep=ratio).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert iva_loss(s, t, w, keep=k).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)

def test_iva_weights_follow_the_instruction():
    "Two instructions on one image read different visual tokens; the weights and the relevance score see it."
    b, h, nv, ni = 2, 3, 6, 2
    n = nv + ni
    logits = torch.zeros(b, h, n, n)
    logits[0, :, nv:, 0] = 5.0; logits[1, :, nv:, 5] = 5.0
    attn = logits.softmax(-1)
    w = iva_weights(attn, range(nv, n), range(nv))
    assert w[0].argmax() == 0 and w[1].argmax() == 5 and torch.allclose(w.sum(1), torch.ones(2))
    same = torch.zeros(b, h, n, n).softmax(-1)
    key, scores = select_iva_layer([same, attn], range(nv, n), range(nv))
    assert key == 1 and scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] > 0.5

def test_registry_and_named_errors():
    assert set(TOKEN_LOSSES) == {'iva', 'tpa_exact', 'tpa_mc'}
    with pytest.raises(KdnbError, match='`keep`'): iva_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.ones(1, 3), keep=1.01)
    with pytest.raises(KdnbError, match='`num_samples`'): tpa_loss_mc(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3),
                                                                      torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), num_samples=2.5)
    with pytest.raises(KdnbError, match='`vis_idx`'): instruction_attention(torch.ones(1, 1, 4, 4) / 4, [3], [0, 7])

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_generator_device_checked():
    z = torch.zeros(1, 2, 3, device='cuda'); q = torch.zeros(1, 2, 3, 3, device='cuda')
    with pytest.raises(KdnbError, match='`generator`'): tpa_loss_mc(z, z, q, q, generator=torch.Generator())
