"""Projectors, teacher norms, grid alignment and stripping: deployable students equal the student,
no projector parameter survives, bad input raises KdnbError, normalization properties (hypothesis)."""
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from kdnb.core import KdnbError, Taps
from kdnb.projectors import (PROJECTORS, NORMS, make_projector, make_norm, align_grid, infer_grid, DistillHeads, DistillModel,
                             strip_projectors, training_only_parameters, is_training_only, TeacherNorm, PhiS, L2Norm, hadamard,
                             LinearProjector, TransformerProjector)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kw(kind):
    return {'n_queries': 16} if kind == 'cross_attention' else {}


class TokenStudent(nn.Module):
    "A tiny patch-token student: 16x16 image -> 4x4 grid of 12-d tokens -> logits."
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 12, 4, 4); self.mix = nn.Linear(12, 12); self.fc = nn.Linear(12, 5)
    def tokens(self, x): return torch.relu(self.mix(self.embed(x).flatten(2).transpose(1, 2)))
    def forward(self, x): return self.fc(self.tokens(x).mean(1))


# --- stripping -----------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(PROJECTORS))
def test_strip_distill_model_every_projector(kind):
    torch.manual_seed(0)
    student = TokenStudent().eval()
    heads = DistillHeads({'t1': 8, 't2': 20}, student_dim=12, kind=kind, tap='tokens', align=kind != 'cross_attention',
                         projector_kw=_kw(kind), norm='l2')
    dm = DistillModel(student, heads)
    x = torch.randn(3, 1, 16, 16)
    # the heads do work during training: predictions in each teacher's space (maps for the 1x1 conv)
    s = student.tokens(x)
    if kind == 'conv1x1':
        pairs = heads(s.transpose(1, 2).reshape(3, 12, 4, 4), {'t1': torch.randn(3, 8, 8, 8), 't2': torch.randn(3, 20, 4, 4)})
        assert pairs['t1'][0].shape == (3, 8, 8, 8)
    else:
        pairs = heads(Taps(tokens=s), {'t1': Taps(tokens=torch.randn(3, 16, 8)), 't2': Taps(tokens=torch.randn(3, 16, 20))})
        assert pairs['t2'][0].shape == (3, 16, 20)
    deployed = strip_projectors(dm)
    with torch.no_grad(): assert torch.equal(deployed(x), student(x)) and torch.equal(dm(x), deployed(x))
    assert training_only_parameters(deployed) == [] and len(training_only_parameters(dm)) > 0
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in student.parameters())
    assert not any(is_training_only(m) for m in deployed.modules())

def test_strip_heads_stored_inside_a_timm_model():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', pretrained=False, num_classes=10).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.kd_heads = DistillHeads({'a': 64, 'b': 32}, student_dim=512, kind='mlp')
    model.layer4[0].add_module('proj', make_projector('conv1x1', 512, 64))   # deep inside a block, unused by its forward
    x = torch.randn(2, 3, 32, 32)
    clean = strip_projectors(model)
    with torch.no_grad(): assert torch.equal(clean(x), model(x))
    assert training_only_parameters(clean) == []
    assert set(clean.state_dict()) == set(reference)                     # exactly the student's keys
    clean.load_state_dict(reference, strict=True)
    assert hasattr(model, 'kd_heads') and hasattr(model.layer4[0], 'proj')   # the original is untouched
    inplace = strip_projectors(model, inplace=True)
    assert inplace is model and not hasattr(model, 'kd_heads')

def test_strip_bad_input():
    with pytest.raises(KdnbError, match='`model`'): strip_projectors(make_projector('linear', 4, 4))
    with pytest.raises(KdnbError, match='`model`'): strip_projectors('resnet')
    plain = nn.Linear(3, 3)
    assert strip_projectors(plain) is plain                               # nothing to strip: returned as is


# --- bad input ---------------------------------------------------------------------------------

def test_unknown_projector_or_norm_name():
    with pytest.raises(KdnbError, match='`kind`') as e: make_projector('perceiver', 8, 8)
    assert 'transformer' in str(e.value)                                  # valid names listed
    with pytest.raises(KdnbError, match='`norm`'): make_norm('zca', 8)
    with pytest.raises(KdnbError, match='`kind`'): DistillHeads({'a': 8}, 4, kind='resnet')

@pytest.mark.parametrize('x, like, kw, fragment', [
    (torch.randn(2, 50, 8), torch.randn(2, 196, 4), {}, '`x_grid`'),                          # 50 tokens: no square grid
    (torch.randn(2, 49, 8), torch.randn(2, 150, 4), {}, '`like_grid`'),
    (torch.randn(2, 49, 8), torch.randn(2, 196, 4), {'x_grid': (5, 10)}, '`x_grid`'),         # grid does not hold 49
    (torch.randn(2, 8, 7, 14), torch.randn(2, 196, 4), {}, 'aspect'),                          # 1:2 vs 1:1
    (torch.randn(2, 32, 8), torch.randn(2, 4, 12, 12), {'x_grid': (4, 8)}, 'aspect'),
    (torch.randn(2, 8), torch.randn(2, 196, 4), {}, 'pooled vector'),                         # vector vs grid
    (torch.randn(2, 49, 8), torch.randn(2, 4), {}, 'pooled vector'),
    (torch.randn(3, 49, 8), torch.randn(2, 196, 4), {}, 'batch'),
    (torch.randn(2, 2, 2, 2, 2), torch.randn(2, 196, 4), {}, '`x`')])
def test_grids_that_cannot_be_aligned(x, like, kw, fragment):
    with pytest.raises(KdnbError) as e: align_grid(x, like, **kw)
    assert fragment in str(e.value)

def test_heads_reject_unalignable_teacher_grid():
    heads = DistillHeads({'t': 16}, student_dim=8, tap='tokens')
    with pytest.raises(KdnbError, match='like_grid'): heads(torch.randn(2, 49, 8), {'t': torch.randn(2, 150, 16)})
    with pytest.raises(KdnbError, match='`teacher_feats`'): heads(torch.randn(2, 49, 8), {'u': torch.randn(2, 49, 16)})
    with pytest.raises(KdnbError, match='`teacher_feats`'): heads(torch.randn(2, 49, 8), {'t': torch.randn(2, 49, 15)})
    with pytest.raises(KdnbError, match='`student_feat`'): heads(torch.randn(2, 49, 9), {'t': torch.randn(2, 49, 16)})

@pytest.mark.parametrize('kind', sorted(PROJECTORS))
def test_projector_channel_mismatch(kind):
    p = make_projector(kind, 8, 4, **_kw(kind))
    x = torch.randn(2, 7, 4, 4) if kind == 'conv1x1' else torch.randn(2, 16, 7)
    with pytest.raises(KdnbError, match='in_dim'): p(x)


# --- properties --------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 6), st.integers(1, 3), st.integers(1, 4), st.floats(-5, 5))
def test_align_keeps_constants_and_same_grid(h, aspect, up, c):
    "Resampling a constant field gives the constant; the same grid is the identity."
    w = h * aspect
    x = torch.full((2, h * w, 3), c)
    like = torch.zeros(2, (h * up) * (w * up), 5)
    y = align_grid(x, like, x_grid=(h, w), like_grid=(h * up, w * up))
    assert y.shape == (2, h * up * w * up, 3) and torch.allclose(y, torch.full_like(y, c), atol=1e-5)
    r = torch.randn(2, h * w, 3)
    assert torch.equal(align_grid(r, torch.zeros(2, h * w, 1), x_grid=(h, w), like_grid=(h, w)), r)

@SETTINGS
@given(st.sampled_from([4, 8, 12, 16, 20, 24, 32, 48]), st.floats(1e-3, 1e3), st.integers(1, 6), st.integers(0, 1000))
def test_phis_is_isotropic_and_invertible(d, scale, rank, seed):
    g = torch.Generator().manual_seed(seed)
    n = 20 * d
    f = (torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
         + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)) * scale + 3 * scale
    ph = PhiS(d).fit(f).eval()
    y = ph(f.float()).double()
    var = y.var(0, correction=0)
    assert torch.allclose(y.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(var, torch.ones(d, dtype=torch.float64), atol=2e-3), var         # every axis unit variance
    back = ph.inverse(y.float()).double()
    assert ((back - f).abs().max() / f.abs().max()) < 1e-4

@pytest.mark.parametrize('n', [1, 2, 4, 8, 12, 20, 24, 32, 44, 48, 60, 96, 192, 384, 640, 768, 1024, 1280])
def test_hadamard(n):
    H = hadamard(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype)) and set(H.unique().tolist()) == ({1.0} if n == 1 else {-1.0, 1.0})

@pytest.mark.parametrize('n', [3, 6, 10, 28, 36])
def test_hadamard_unsupported_sizes(n):
    "Orders that are not 1, 2 or 2^k (q+1) with q prime = 3 mod 4 (28 and 36 exist but need other constructions)."
    with pytest.raises(KdnbError, match='`n`'): hadamard(n)
    with pytest.raises(KdnbError, match='standardize'): PhiS(n)

@SETTINGS
@given(st.floats(1e-3, 1e4), st.floats(-100, 100), st.integers(0, 1000))
def test_teacher_norm_converges_to_unit_stats(scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    tn = TeacherNorm(6, init_from_first=True)
    for _ in range(30): tn(torch.randn(32, 5, 6, generator=g) * scale + offset)
    y = tn.eval()(torch.randn(4096, 6, generator=g) * scale + offset)
    assert torch.allclose(y.mean(0), torch.zeros(6), atol=0.15) and torch.allclose(y.std(0), torch.ones(6), atol=0.15)

@pytest.mark.parametrize('norm', ['standardize', 'phis', 'l2', 'layernorm'])
def test_no_teacher_dominates_after_normalization(norm):
    "Three teachers whose raw features differ by 1e4 in scale: after the norm a zero prediction costs each about the same."
    torch.manual_seed(0)
    feats = {'small': torch.randn(512, 16) * 0.01 + 0.02, 'mid': torch.randn(512, 16) * 1.0, 'large': torch.randn(512, 16) * 100 - 50}
    raw = {k: f.pow(2).mean().item() for k, f in feats.items()}
    assert max(raw.values()) / min(raw.values()) > 1e6
    heads = DistillHeads({k: 16 for k in feats}, student_dim=16, norm=norm, norm_kw={'init_from_first': True} if norm in ('standardize', 'phis') else None)
    for _ in range(3): tg = heads.targets(feats)
    after = {k: t.pow(2).mean().item() for k, t in tg.items()}
    assert max(after.values()) / min(after.values()) < 1.5, after


# --- heads in training ----------------------------------------------------------------------------

@pytest.mark.parametrize('direction', ['student_to_teacher', 'teacher_to_shared'])
def test_heads_train_and_gradients_go_where_they_should(direction):
    torch.manual_seed(0)
    student = nn.Linear(10, 6)
    W = {'a': torch.randn(10, 12), 'b': torch.randn(10, 24) * 50}
    heads = DistillHeads({'a': 12, 'b': 24}, student_dim=6, kind='mlp', norm='standardize', direction=direction, shared_dim=8,
                         norm_kw={'init_from_first': True})
    params = list(student.parameters()) + [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, 1e-2)
    losses = []
    for step in range(150):
        x = torch.randn(64, 10)
        pairs = heads(student(x), {k: x @ w for k, w in W.items()})
        loss = sum((p - t).pow(2).mean() for p, t in pairs.values())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    # one student head against every teacher (teacher_to_shared) keeps the teachers' disagreement as a floor
    assert np.mean(losses[-10:]) < (0.5 if direction == 'student_to_teacher' else 0.7) * np.mean(losses[:10])
    assert all(p.grad is not None for p in student.parameters())
    if direction == 'teacher_to_shared':
        assert all(p.grad is None and not p.requires_grad for p in heads.teacher_proj.parameters())
        assert len(heads.student_proj) == 1

def test_transformer_projector_mixes_tokens_mlp_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 8)
    for kind, expect_mixing in [('transformer', True), ('mlp', False), ('linear', False)]:
        p = make_projector(kind, 8, 8).eval()
        x2 = x.clone(); x2[0, 4] += torch.randn(8)                       # (a constant shift would vanish in LayerNorm)
        with torch.no_grad(): moved = (p(x2) - p(x)).abs().amax(-1)[0]
        others = torch.cat([moved[:4], moved[5:]])
        assert bool((others > 1e-6).all()) == expect_mixing and bool((others > 1e-6).any()) == expect_mixing
