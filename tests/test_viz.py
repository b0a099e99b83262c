"""The three explorers driven from code: every control is set like a user would, and the plotted data is checked
against numbers computed here independently (numpy/torch references, not the explorers' own helpers)."""
import json, math
import numpy as np
import pytest
import torch

from kdnb.core import KdnbError, seed_everything
from kdnb.data import load_data
from kdnb.models import create_model
from kdnb.distill import Distiller, kd_objectives
from kdnb.mgda import make_combiner, min_norm_solution, dto_kd_weights
from kdnb.viz import (MGDAExplorer, corollary_rows, PRESETS, METHODS, mgda_figure, mgda_run_figure, mgda_log, gradients_2d, read_log,
                      trace_by_name)
from kdnb.viz_tokens import TokenExplorer, InstructedViT, token_alignment_figure, TokenAlignment
from kdnb.viz_magnitudes import MagnitudeExplorer, magnitudes_figure, magnitude_run_figure, run_shares, NORM_NAMES


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(): return load_data('digits')


def _teachers():
    seed_everything(0)
    return {'resnet': create_model('resnet_t', 10, 1, taps=('logits', 'embedding')).eval(),
            'vit': create_model('vit_t', 10, 1, taps=('logits', 'embedding')).eval()}


def _run(data, out, combiner, ce_weight=0.0, steps=8):
    seed_everything(0)
    student = create_model('vit_s', 10, 1, taps=('logits', 'embedding'))
    teachers = _teachers()
    Distiller(student, teachers, data, kd_objectives(list(teachers), ce_weight=ce_weight),
              combiner=make_combiner(combiner) if combiner else None, epochs=1, budget_steps=steps, log_every=1,
              out_dir=out, progress=False, batch_size=32).fit()
    return out


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    return dict(mgda=_run(data, root / 'mgda', 'mgda_ub'), dto3=_run(data, root / 'dto3', 'dto_kd', ce_weight=0.2),
                plain=_run(data, root / 'plain', None, steps=4))


def end(t): return np.array([t.x[-1], t.y[-1]], dtype=float)


# ---------------------------------------------------------------- 1. MGDA


def ref_min_norm_2(g):
    "Closed form for two gradients (Sener & Koltun): a1 = clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1)."
    g1, g2 = g
    den = float((g1 - g2) @ (g1 - g2))
    a1 = 0.5 if den == 0 else min(max(float((g2 - g1) @ g2) / den, 0.0), 1.0)
    return np.array([a1, 1 - a1])


@pytest.mark.parametrize('a2,n1,n2', [(40.0, 1.0, 2.0), (100.0, 0.5, 2.5), (135.0, 2.0, 0.3), (179.0, 1.0, 1.0), (300.0, 1.2, 0.7)])
def test_mgda_sliders_two(a2, n1, n2):
    ex = MGDAExplorer()
    ex.angle[0].value = 10.0; ex.angle[1].value = a2; ex.norm[0].value = n1; ex.norm[1].value = n2
    t1, t2 = math.radians(10.0), math.radians(a2)
    g = np.array([[n1 * math.cos(t1), n1 * math.sin(t1)], [n2 * math.cos(t2), n2 * math.sin(t2)]])
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g1')), g[0], atol=1e-12)
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g2')), g[1], atol=1e-12)
    a = ref_min_norm_2(g)
    np.testing.assert_allclose(a, min_norm_solution(torch.tensor(g)).numpy(), atol=1e-9)
    np.testing.assert_allclose(trace_by_name(ex.fig, 'weights MGDA').y, a, atol=1e-9)
    gs = a @ g
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g* (MGDA)')), gs, atol=1e-9)
    for i in range(2):                                               # the foot of the perpendicular from g* on g_i's line
        foot = end(trace_by_name(ex.fig, f'proj g{i + 1}'))
        np.testing.assert_allclose(foot, (gs @ g[i]) / (g[i] @ g[i]) * g[i], atol=1e-9)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)                 # DTO-KD (our reading): min-norm of unit gradients,
    au = ref_min_norm_2(u); du = au @ u                              # rescaled to |d| = sum a_i |g_i|
    d = du / np.linalg.norm(du) * (au @ np.array([n1, n2]))
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'd (DTO-KD)')), d, atol=1e-7)
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'd (sum / K)')), g.mean(0), atol=1e-12)
    c1_mean = bool(((g @ g.mean(0)) > 0).all())                      # corollary 1 of the plain average, in the live line
    assert (f'1:✓' if c1_mean else '1:✗') in ex.summary.value.split('MGDA')[0]
    table = trace_by_name(ex.fig, 'corollaries').cells.values
    assert table[2][3].startswith('FAILS' if np.linalg.norm(gs) < min(n1, n2) * (1 - 1e-6) else 'holds')   # MGDA, corollary 3


def test_mgda_three_and_toggle():
    ex = MGDAExplorer()
    ex.k.value = 3
    ex.angle[2].value = 250.0; ex.norm[2].value = 1.1
    g = gradients_2d([s.value for s in ex.angle], [s.value for s in ex.norm])
    assert trace_by_name(ex.fig, 'g3').visible is True and ex.angle[2].layout.display is None
    a = min_norm_solution(torch.tensor(g)).numpy()
    np.testing.assert_allclose(trace_by_name(ex.fig, 'weights MGDA').y, a, atol=1e-8)
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g* (MGDA)')), a @ g, atol=1e-8)
    hull = trace_by_name(ex.fig, 'hull')
    assert len(hull.x) == 4 and hull.fill == 'toself'                # a closed triangle
    ex.k.value = 2
    assert trace_by_name(ex.fig, 'g3').visible is False and ex.angle[2].layout.display == 'none'
    assert len(trace_by_name(ex.fig, 'weights MGDA').y) == 2


@pytest.mark.parametrize('name', list(PRESETS))
def test_mgda_presets(name):
    ex = MGDAExplorer()
    ex.preset.value = name
    angles, norms = PRESETS[name]
    assert ex.k.value == len(angles)
    np.testing.assert_allclose([s.value for s in ex.angle[:len(angles)]], angles)
    g = gradients_2d(angles, norms)
    a = min_norm_solution(torch.tensor(g)).numpy()
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g* (MGDA)')), a @ g, atol=1e-8)
    G = g @ g.T
    np.testing.assert_allclose(trace_by_name(ex.fig, 'weights DTO-KD').y, dto_kd_weights(G)[0], atol=1e-9)
    if 'antiparallel (180' in name or 'around the origin' in name:
        assert np.linalg.norm(a @ g) < 1e-9 and '1:✗' in ex.summary.value
    if 'dominating' in name:
        np.testing.assert_allclose(a, [1.0, 0.0], atol=1e-12)        # MGDA follows the short gradient


def test_mgda_run_mode_matches_log(runs):
    recs = [json.loads(l) for l in (runs['mgda'] / 'log.jsonl').read_text().splitlines()]
    recs = [r for r in recs if 'mgda/cos_12' in r]
    ex = MGDAExplorer(runs['mgda'])
    assert ex.run_log is not None and ex.step.max == len(recs) - 1
    for j in range(len(recs)):
        ex.step.value = j
        r = recs[j]
        n = r['mgda/grad_norms']
        np.testing.assert_allclose([ex.norm[0].value, ex.norm[1].value], n, rtol=1e-9)
        np.testing.assert_allclose(math.cos(math.radians(ex.angle[1].value - ex.angle[0].value)), r['mgda/cos_12'], atol=1e-9)
        g1, g2 = end(trace_by_name(ex.fig, 'g1')), end(trace_by_name(ex.fig, 'g2'))
        np.testing.assert_allclose([np.linalg.norm(g1), np.linalg.norm(g2)], n, rtol=1e-9)
        # MGDA-UB solved the same 2 x 2 problem during training: the replayed weights are the logged ones
        np.testing.assert_allclose(trace_by_name(ex.fig, 'weights MGDA').y, r['mgda/weights'], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(end(trace_by_name(ex.fig, 'g* (MGDA)'))), r['mgda/norm_d'], rtol=1e-6)
        sel = trace_by_name(ex.run_fig, 'selected cos')
        assert sel.x == (r['step'],) and sel.y == (r['mgda/cos_12'],)
        assert f"step {r['step']}" in ex.step_label.value
    cos = trace_by_name(ex.run_fig, 'cos(g1, g2)')
    np.testing.assert_allclose(cos.y, [r['mgda/cos_12'] for r in recs])
    np.testing.assert_allclose(trace_by_name(ex.run_fig, 'weight vit').y, [r['mgda/weights'][1] for r in recs])


def test_mgda_run_three_objectives(runs):
    ex = MGDAExplorer(runs['dto3'])
    assert ex.run_log['K'] == 3 and ex.run_log['names'] == ['ce', 'resnet', 'vit']
    ex.step.value = ex.step.max
    assert 'objectives 1-2 of 3' in ex.step_label.value
    assert list(trace_by_name(ex.fig, 'weights MGDA').x) == ['ce', 'resnet']


def test_mgda_bad_runs(runs, tmp_path):
    ex = MGDAExplorer(runs['plain'])                                 # a weighted-sum run: no gradient diagnostics
    assert ex.run_log is None and ex.step is None and 'kdnb-error' in ex.message.value and 'combiner=' in ex.message.value
    assert ex.fig is not None                                        # the playground still works
    ex.angle[1].value = 150.0
    assert abs(math.degrees(math.atan2(*end(trace_by_name(ex.fig, 'g2'))[::-1])) - 150.0) < 1e-9
    ex = MGDAExplorer(tmp_path)                                      # an empty folder
    assert 'log.jsonl' in ex.message.value
    with pytest.raises(KdnbError, match='`run`'): mgda_log(runs['plain'])
    with pytest.raises(KdnbError, match='`run`'): mgda_run_figure(tmp_path)
    with pytest.raises(KdnbError, match='`grads`'): mgda_figure(np.zeros((2, 3)))


# ---------------------------------------------------------------- 2. tokens


def ref_query_attention(attn, q, v, heads):
    "Pool heads, average the query rows, keep the visual columns, renormalize (float64, by hand)."
    a = attn.double()
    a = a.mean(1) if heads == 'mean' else a.amax(1) if heads == 'max' else a[:, heads]
    rows = a[:, q].mean(1)[:, v]
    return rows / rows.sum(-1, keepdim=True)


@pytest.fixture(scope='module')
def inst_models():
    seed_everything(0)
    return InstructedViT(dim=24, depth=3, heads=3).eval(), InstructedViT(dim=16, depth=2, heads=2).eval()


def test_token_explorer_controls(data, inst_models):
    teacher, student = inst_models
    x = data.normalize(data.images[:5])
    ex = TokenExplorer(teacher, x, student=student, display=data.images[:5])
    assert [o[1] for o in ex.instruction.options] == list(teacher.instructions)
    with torch.no_grad():
        t_out = {i: teacher(x, i) for i in teacher.instructions}
    for index, instr, layer, heads, keep in [(0, 'digit', 'blocks.0', 'mean', 0.5), (3, 'ink_top', 'blocks.2', 'max', 0.25),
                                            (4, 'ink_left', 'blocks.1', 2, 0.1), (1, 'even', 'blocks.2', 0, 1.0)]:
        ex.index.value, ex.instruction.value, ex.layer.value, ex.heads.value, ex.keep.value = index, instr, layer, heads, keep
        w = ref_query_attention(t_out[instr]['attn'][layer], teacher.instr_idx, teacher.vis_idx, heads)[index]
        z = np.asarray(trace_by_name(ex.fig, 'attention').z, dtype=float).reshape(-1)
        np.testing.assert_allclose(z, w.numpy(), atol=1e-6)
        k = math.ceil(keep * 64 - 1e-9)
        kept = trace_by_name(ex.fig, 'kept')
        kx, ky = np.asarray(kept.x, dtype=float), np.asarray(kept.y, dtype=float)
        kx, ky = kx[np.isfinite(kx)], ky[np.isfinite(ky)]
        bars = np.asarray(trace_by_name(ex.fig, 'weights kept').y, dtype=float)
        assert len(kx) == k == np.isfinite(bars).sum()
        np.testing.assert_allclose(np.sort(bars[np.isfinite(bars)]), np.sort(z)[::-1][:k][::-1], atol=1e-7)
        top = set(torch.topk(torch.tensor(z), k).indices.tolist())
        cells = {int(round((yy + 0.5) / 4 - 0.5)) * 8 + int(round((xx + 0.5) / 4 - 0.5)) for xx, yy in zip(kx, ky)}
        assert cells == top                                          # the outlined tokens are the top-k
        err = np.asarray(trace_by_name(ex.fig, 'error').z, dtype=float).reshape(-1)
        assert err.shape == (64,) and np.isfinite(err).all()
        kw = z * np.isin(np.arange(64), list(top))
        np.testing.assert_allclose(ex.result['iva_loss'], (kw * err).sum() / kw.sum(), rtol=1e-4)
        assert f"{ex.result['iva_loss']:.4g}" in ex.summary.value
    # the layer menu shows Align-TI's instruction relevance of the selected image, computed here by hand
    b = ex.index.value
    for label, layer in ex.layer.options:
        al = torch.stack([ref_query_attention(t_out[i]['attn'][layer], teacher.instr_idx, teacher.vis_idx, 'mean')[b]
                          for i in teacher.instructions])
        cos = [torch.nn.functional.cosine_similarity(al[p], al[q], dim=0) for p in range(4) for q in range(p + 1, 4)]
        assert f"relevance {1 - torch.stack(cos).mean().item():.3f}" in label


def test_token_explorer_vit_and_errors(data):
    seed_everything(0)
    vit = create_model('vit_t', 10, 1).eval()
    x = data.normalize(data.images[:3])
    ex = TokenExplorer(vit, x, student=create_model('vit_s', 10, 1).eval())
    assert ex.instruction.disabled and [o[1] for o in ex.layer.options] == [f'blocks.{i}' for i in range(4)]
    assert ex.layer.value == 'blocks.3'                              # CLS only: no relevance, the last layer
    ex.layer.value = 'blocks.1'; ex.heads.value = 1
    with torch.no_grad():
        attn = vit.with_taps(('attn',), attn_blocks=[1])(x).attn['blocks.1']
    np.testing.assert_allclose(np.asarray(trace_by_name(ex.fig, 'attention').z, dtype=float).reshape(-1),
                               ref_query_attention(attn, [0], list(range(1, 65)), 1)[0].numpy(), atol=1e-6)
    bad = TokenExplorer(create_model('resnet_t', 10, 1), x)          # no attention taps: a message, no traceback
    assert bad.data is None and 'without attention taps' in bad.message.value and bad.children == (bad.message,)
    half = TokenExplorer(vit, x, student=create_model('resnet_t', 10, 1))   # a student without tokens: warning, no error map
    assert 'without token taps' in half.message.value and half.result['errors'] is None
    assert np.isnan(np.asarray(trace_by_name(half.fig, 'error').z, dtype=float)).all()
    with pytest.raises(KdnbError, match='`res`'): token_alignment_figure({})


# ---------------------------------------------------------------- 3. magnitudes


def ref_after(f, norm):
    "Each normalization by hand (float64), statistics from all rows."
    f = f.double()
    if norm == 'none': return f
    if norm == 'l2': return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    if norm == 'layernorm': return (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-6)
    if norm == 'standardize': return (f - f.mean(0)) / (f.std(0) + 1e-6 + 1e-6)
    c = f - f.mean(0)                                               # phis: isotropic: every direction gets variance phi^2 / phi^2
    lam = torch.linalg.eigvalsh(torch.cov(c.T, correction=0)).clamp_min(0)
    return c / lam.mean().sqrt()


def test_magnitude_explorer_norms(data):
    teachers = _teachers()
    x = data.normalize(data.images[:48])
    with torch.no_grad():
        raw = {k: m(x).embedding for k, m in teachers.items()}
    ex = MagnitudeExplorer(teachers, x, norm='none')
    for k in teachers:
        np.testing.assert_allclose(trace_by_name(ex.fig, f'before {k}').y, raw[k].double().norm(dim=-1).numpy(), rtol=1e-5)
    for norm in NORM_NAMES:
        ex.norm.value = norm
        ms = {}
        for k in teachers:
            ref = ref_after(raw[k], norm)
            tol = 2e-3 if norm in ('standardize', 'phis') else 1e-5
            np.testing.assert_allclose(trace_by_name(ex.fig, f'after {k}').y, ref.norm(dim=-1).numpy(), rtol=tol, atol=tol)
            ms[k] = float((ref ** 2).mean())
        share = np.array([ms[k] for k in teachers]); share /= share.sum()
        np.testing.assert_allclose(trace_by_name(ex.fig, 'share after').y, share, rtol=5e-3, atol=1e-4)
        assert f'<b>{norm}</b>' in ex.summary.value and f'{max(share) / min(share):.2f}x' in ex.summary.value
    ex.log_scale.value = True
    assert ex.fig.layout.yaxis.type == 'log' and ex.fig.layout.yaxis2.type == 'log'


def test_magnitude_run_mode(runs):
    recs = read_log(runs['dto3'])
    ex = MagnitudeExplorer(run=runs['dto3'])
    names = ['ce', 'resnet', 'vit']
    c = np.array([[r[f'weight/{n}'] * r[f'loss/{n}'] for n in names] for r in recs])
    for i, n in enumerate(names):
        np.testing.assert_allclose(trace_by_name(ex.run_fig, f'loss share {n}').y, c[:, i] / c.sum(1), rtol=1e-9)
    g = np.array([np.array(r['mgda/weights']) * np.array(r['mgda/grad_norms']) for r in recs if 'mgda/grad_norms' in r])
    np.testing.assert_allclose(trace_by_name(ex.run_fig, 'grad share vit').y, g[:, 2] / g.sum(1), rtol=1e-9)
    np.testing.assert_allclose(trace_by_name(ex.run_fig, 'mag/resnet').y, [r['mag/resnet'] for r in recs])
    assert ex.message.value == ''


def test_magnitude_bad_input(runs, data, tmp_path):
    x = data.normalize(data.images[:8])
    ex = MagnitudeExplorer({'r': create_model('resnet_t', 10, 1)}, x, run=runs['plain'])   # no embedding tap
    assert ex.feats is None and '`tap`' in ex.message.value and ex.run_fig is not None
    assert 'no gradient norms' in ex.message.value                   # a plain run: loss shares only
    ex = MagnitudeExplorer(run=tmp_path)
    assert 'kdnb-error' in ex.message.value and 'log.jsonl' in ex.message.value
    (tmp_path / 'log.jsonl').write_text(json.dumps(dict(step=1, loss=1.0)) + '\n')
    with pytest.raises(KdnbError, match='`run`'): run_shares(tmp_path)
    with pytest.raises(KdnbError, match='`feats`'): magnitudes_figure({})
    with pytest.raises(KdnbError, match='`norm`'): MagnitudeExplorer(norm='whiten')


def test_every_change_redraws_in_full():
    "Shown or not, every control change puts a fresh FigureWidget (table included) in the old one's place and closes it."
    ex = MGDAExplorer()
    ex._repr_mimebundle_()
    seen = [ex.fig]
    for change in (lambda: setattr(ex.angle[1], 'value', 140.0), lambda: setattr(ex.preset, 'value', 'antiparallel (180°)'),
                   lambda: setattr(ex.k, 'value', 3)):
        change()
        assert ex.fig not in seen and ex.fig in ex.children and all(f not in ex.children for f in seen)
        assert seen[-1].comm is None                                     # the old widget is closed
        seen.append(ex.fig)
    table = trace_by_name(ex.fig, 'corollaries')
    assert list(table.cells.values[0]) == corollary_rows(ex.comb)[0] and len(table.cells.values) == 4
    np.testing.assert_allclose(end(trace_by_name(ex.fig, 'g2')), gradients_2d([180.0], [1.5])[0], atol=1e-12)
    assert len(trace_by_name(ex.fig, 'weights MGDA').x) == 3
