"""Metrics: linear CKA and ECE against independent numpy computations from the papers' formulas, CKA
invariances as hypothesis properties, the streaming accumulator against the pure functions for any
batch split, inference-mode use, a 2-process gloo reduction, and a KdnbError for each bad input."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from scipy.stats import ortho_group

from kdnb.core import KdnbError, Taps
from kdnb.metrics import (topk_accuracy, agreement, teacher_kl, expected_calibration_error, reliability_bins,
                          plot_reliability, linear_cka, feature_magnitude, magnitude_summary, MetricAccumulator, evaluate)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (restored afterwards)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- independent references (numpy, written from the formulas) -------------------------------------

def cka_reference(X, Y):
    "Kornblith et al. 2019, eq. for linear CKA via HSIC with the centering matrix H = I - 11^T/n."
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H) / (n - 1) ** 2
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))

def softmax_np(z):
    z = np.asarray(z, np.float64); e = np.exp(z - z.max(1, keepdims=True)); return e / e.sum(1, keepdims=True)

def ece_reference(logits, target, n_bins):
    "Guo et al. 2017: sum over bins (lo, hi] of |B_m|/n |acc(B_m) - conf(B_m)|, by an explicit loop."
    p = softmax_np(logits); conf, pred = p.max(1), p.argmax(1); correct = (pred == np.asarray(target))
    ece, n = 0.0, len(conf)
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        inb = (conf > lo) & (conf <= hi)
        if inb.any(): ece += inb.sum() / n * abs(correct[inb].mean() - conf[inb].mean())
    return ece

def rand_logits(seed, n=200, c=10, scale=3.0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(size=(n, c)) * scale), torch.tensor(rng.integers(0, c, n))


# --- linear CKA ------------------------------------------------------------------------------------

@pytest.mark.parametrize('n,d1,d2', [(50, 8, 12), (30, 64, 40), (200, 3, 3), (5, 100, 7)])
def test_cka_matches_numpy_reference(n, d1, d2):
    rng = np.random.default_rng(n + d1 + d2)
    X = rng.normal(size=(n, d1)); Y = X @ rng.normal(size=(d1, d2)) + rng.normal(size=(n, d2))
    assert linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(cka_reference(X, Y), abs=1e-10)
    assert linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)) == pytest.approx(cka_reference(X, Y), abs=1e-5)

def test_cka_flattens_trailing_dims_and_handles_degenerate():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, 3, dtype=torch.float64, generator=g)
    Y = X.reshape(20, 12) @ torch.randn(12, 5, dtype=torch.float64, generator=g)
    assert linear_cka(X, Y) == pytest.approx(cka_reference(X.reshape(20, 12).numpy(), Y.numpy()), abs=1e-10)
    assert math.isnan(linear_cka(torch.full((10, 4), 3.0), torch.randn(10, 4)))     # no variance: undefined

dims = st.integers(1, 12)

@SETTINGS
@given(n=st.integers(3, 40), d1=dims, d2=dims, seed=st.integers(0, 2**31 - 1),
       scale=st.floats(1e-3, 1e3), shift=st.floats(-100, 100))
def test_cka_invariances(n, d1, d2, seed, scale, shift):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d1)); Y = np.concatenate([X[:, :1] * 2, rng.normal(size=(n, d2))], 1)
    base = linear_cka(torch.tensor(X), torch.tensor(Y))
    if math.isnan(base): return
    assert 0.0 <= base <= 1.0
    assert linear_cka(torch.tensor(X), torch.tensor(X)) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(torch.tensor(Y), torch.tensor(X)) == pytest.approx(base, abs=1e-9)          # symmetric
    Q1 = ortho_group.rvs(d1, random_state=seed) if d1 > 1 else np.array([[-1.0]])
    Q2 = ortho_group.rvs(Y.shape[1], random_state=seed + 1)
    moved = linear_cka(torch.tensor(scale * X @ Q1 + shift), torch.tensor(Y @ Q2 / scale))
    assert moved == pytest.approx(base, abs=1e-7)
    assert base == pytest.approx(cka_reference(X, Y), abs=1e-8)


# --- ECE and reliability bins ----------------------------------------------------------------------

@pytest.mark.parametrize('seed,n_bins,scale', [(0, 15, 3.0), (1, 10, 0.5), (2, 1, 5.0), (3, 50, 2.0), (4, 7, 20.0)])
def test_ece_matches_numpy_reference(seed, n_bins, scale):
    z, y = rand_logits(seed, n=500, scale=scale)
    y = torch.where(torch.rand(500, generator=torch.Generator().manual_seed(seed)) < 0.5, z.argmax(1), y)   # some accuracy
    assert expected_calibration_error(z, y, n_bins) == pytest.approx(ece_reference(z.numpy(), y.numpy(), n_bins), abs=1e-12)
    assert expected_calibration_error(z.float(), y, n_bins) == pytest.approx(ece_reference(z.numpy(), y.numpy(), n_bins), abs=1e-5)

def test_reliability_bins_match_reference():
    z, y = rand_logits(7, n=300)
    rb = reliability_bins(z, y, n_bins=12)
    p = softmax_np(z.numpy()); conf, ok = p.max(1), p.argmax(1) == y.numpy()
    for m in range(12):
        inb = (conf > m / 12) & (conf <= (m + 1) / 12)
        assert rb['count'][m] == inb.sum()
        if inb.any():
            assert rb['accuracy'][m] == pytest.approx(ok[inb].mean()) and rb['confidence'][m] == pytest.approx(conf[inb].mean())
        else: assert math.isnan(rb['accuracy'][m])
    fig = plot_reliability(rb)
    assert fig.data[0].type == 'bar' and len(fig.data[0].x) == 12

@SETTINGS
@given(seed=st.integers(0, 10**6), n_bins=st.integers(1, 30), scale=st.floats(0.01, 30))
def test_ece_in_unit_interval(seed, n_bins, scale):
    z, y = rand_logits(seed, n=64, scale=scale)
    assert 0.0 <= expected_calibration_error(z, y, n_bins) <= 1.0

def test_ece_on_bin_edges():
    "A confidence exactly on an edge m/M belongs to the bin that ends there: (lo, hi]."
    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(4, 1)   # softmax max = 0.75
    rb = reliability_bins(z, torch.tensor([0, 0, 0, 1]), n_bins=4)              # edges 0, .25, .5, .75, 1
    assert rb['count'].tolist() == [0, 0, 4, 0]
    assert expected_calibration_error(z, torch.tensor([0, 0, 0, 1]), 4) == pytest.approx(0.0, abs=1e-12)


# --- accuracy, fidelity, magnitudes --------------------------------------------------------------

def test_topk_agreement_kl_against_numpy():
    z, y = rand_logits(3, n=400, c=7)
    zt, _ = rand_logits(4, n=400, c=7)
    order = np.argsort(-z.numpy(), 1)
    for k in (1, 3, 5, 9):
        want = np.mean([y[i].item() in order[i, :min(k, 7)] for i in range(400)])
        assert topk_accuracy(z, y, ks=(k,))[f'top{k}'] == pytest.approx(want)
    assert agreement(z, zt) == pytest.approx(np.mean(z.numpy().argmax(1) == zt.numpy().argmax(1)))
    for T in (1.0, 3.0):
        ps, pt = softmax_np(z.numpy() / T), softmax_np(zt.numpy() / T)
        assert teacher_kl(z, zt, T) == pytest.approx(np.mean(np.sum(pt * np.log(pt / ps), 1)), rel=1e-9)

def test_feature_magnitude_against_numpy():
    x = np.random.default_rng(0).normal(size=(3, 5, 4, 6))
    want = np.sqrt((x ** 2).sum(1)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(feature_magnitude(torch.tensor(x)).numpy(), want, rtol=1e-12)
    s = magnitude_summary({'m': torch.tensor(x)})['m']
    assert s['mean'] == pytest.approx(want.mean()) and s['std'] == pytest.approx(want.std()) and s['median'] == pytest.approx(np.median(want))


# --- the accumulator -------------------------------------------------------------------------------

def make_stream(n=300, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, 8, generator=g); z = e @ torch.randn(8, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    et = e @ torch.randn(8, 5, generator=g) + 0.5 * torch.randn(n, 5, generator=g)
    zt = et @ torch.randn(5, c, generator=g)
    return z, y, e, zt, et

@SETTINGS
@given(cuts=st.lists(st.integers(1, 299), max_size=6, unique=True), cap=st.integers(2, 400))
def test_accumulator_equals_pure_functions_for_any_split(cuts, cap):
    z, y, e, zt, et = make_stream()
    acc = MetricAccumulator(ks=(1, 3), n_bins=8, T=2.0, cka_samples=cap)
    b = [0] + sorted(cuts) + [300]
    for lo, hi in zip(b, b[1:]):
        acc.update(z[lo:hi], y[lo:hi], teachers={'t': Taps(logits=zt[lo:hi], embedding=et[lo:hi])}, embedding=e[lo:hi])
    r = acc.compute()
    assert r['n'] == 300
    assert r['top1'] == pytest.approx(topk_accuracy(z, y, (1, 3))['top1'], abs=1e-12)
    assert r['top3'] == pytest.approx(topk_accuracy(z, y, (1, 3))['top3'], abs=1e-12)
    assert r['ece'] == pytest.approx(expected_calibration_error(z, y, 8), abs=1e-9)
    assert r['teachers']['t']['agreement'] == pytest.approx(agreement(z, zt), abs=1e-12)
    assert r['teachers']['t']['kl'] == pytest.approx(teacher_kl(z, zt, 2.0), rel=1e-5)
    m = min(cap, 300)
    assert r['teachers']['t']['cka'] == pytest.approx(cka_reference(e[:m].numpy(), et[:m].numpy()), abs=1e-6)
    assert acc.compute() == r                                                 # compute() does not change the state

def test_accumulator_partial_teachers_and_no_embeddings():
    z, y, e, zt, et = make_stream()
    acc = MetricAccumulator(cka_samples=100)
    acc.update(z[:100], y[:100], teachers={'a': zt[:100]}, embedding=e[:100], teacher_embeddings={'a': et[:100]})
    acc.update(z[100:], y[100:], teachers={'a': zt[100:], 'b': zt[100:] * 2})   # 'b' only seen later
    r = acc.compute()
    assert r['teachers']['b']['agreement'] == pytest.approx(agreement(z[100:], zt[100:] * 2))
    assert 'cka' not in r['teachers']['b'] and r['teachers']['a']['cka'] == pytest.approx(cka_reference(e[:100].numpy(), et[:100].numpy()), abs=1e-6)
    r0 = MetricAccumulator(cka_samples=0).update(z, y, embedding=e, teacher_embeddings={'a': et}).compute()
    assert 'teachers' not in r0

def test_accumulator_inside_and_outside_inference_mode():
    "Counters created under inference mode must still accept updates outside it (and vice versa)."
    z, y, e, zt, et = make_stream()
    acc = MetricAccumulator()
    with torch.inference_mode():
        acc.update(z[:50], y[:50], teachers={'t': Taps(logits=zt[:50], embedding=et[:50])}, embedding=e[:50])
    acc.update(z[50:], y[50:], teachers={'t': Taps(logits=zt[50:], embedding=et[50:])}, embedding=e[50:])
    assert acc.compute()['top1'] == pytest.approx(topk_accuracy(z, y)['top1'])
    acc2 = MetricAccumulator().update(z[:50], y[:50])
    with torch.inference_mode(): acc2.update(z[50:], y[50:])
    assert acc2.compute()['n'] == 300

def test_evaluate_with_module_and_logit_teachers():
    from kdnb.data import load_data, TensorLoader
    data = load_data('digits')
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 10)).train()
    teacher = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(16, 10)).eval()
    calls = []
    def bank(x, idx):
        calls.append(idx.clone()); return {'lin': teacher(x)}
    loader = TensorLoader(data, 'val', batch_size=100)
    r = evaluate(model, loader, teachers=bank, device='cpu', n_bins=5)
    assert model.training                                   # restored after the eval-mode pass
    _, y, idx = data.split('val')
    with torch.no_grad():   # the same batches as evaluate saw, so the logits are bitwise the same
        zs, zt = (torch.cat([m(x) for x, _, _ in loader]) for m in (model.eval(), teacher))
    model.train()
    assert len(calls) == len(loader) and torch.equal(torch.cat(calls), idx)
    assert r['top1'] == pytest.approx(topk_accuracy(zs, y)['top1'])
    assert r['ece'] == pytest.approx(expected_calibration_error(zs, y, 5), abs=1e-6)
    assert r['teachers']['lin']['kl'] == pytest.approx(teacher_kl(zs, zt), rel=1e-4)


# --- bad input: each check names its argument ------------------------------------------------------

z8, y8 = torch.randn(8, 4), torch.randint(0, 4, (8,))
BAD = [
    (lambda: topk_accuracy(z8, y8[:5]), 'target'),                                 # mismatched batch sizes
    (lambda: topk_accuracy(z8, y8.float()), 'target'),
    (lambda: topk_accuracy(z8, y8 + 4), 'target'),                                 # label out of range
    (lambda: topk_accuracy(z8.flatten(), y8), 'logits'),
    (lambda: topk_accuracy(z8, y8, ks=()), 'ks'),
    (lambda: topk_accuracy(z8 * float('nan'), y8), 'logits'),                      # NaN
    (lambda: agreement(z8, torch.randn(8, 5)), 'teacher_logits'),                  # class dims
    (lambda: agreement(z8, torch.randn(7, 4)), 'teacher_logits'),
    (lambda: agreement(torch.randint(0, 3, (8, 4)), z8), 'student_logits'),
    (lambda: teacher_kl(z8, z8, T=-1.0), 'T'),
    (lambda: teacher_kl(z8, z8.masked_fill(z8 > 0, float('inf'))), 'teacher_logits'),
    (lambda: expected_calibration_error(z8, y8, n_bins=0), 'n_bins'),
    (lambda: expected_calibration_error(z8, y8, n_bins=2.5), 'n_bins'),
    (lambda: reliability_bins(z8, y8, n_bins=-3), 'n_bins'),
    (lambda: linear_cka(torch.randn(10, 3), torch.randn(9, 3)), 'Y'),              # different sample counts
    (lambda: linear_cka(torch.randn(1, 3), torch.randn(1, 3)), 'X'),
    (lambda: linear_cka(torch.randn(10), torch.randn(10, 3)), 'X'),
    (lambda: linear_cka(torch.full((10, 3), float('nan')), torch.randn(10, 3)), 'X'),
    (lambda: feature_magnitude(torch.randn(2, 3, 4, 5, 6)), 'x'),
    (lambda: feature_magnitude(torch.ones(2, 3, dtype=torch.long)), 'x'),
    (lambda: magnitude_summary([torch.randn(2, 3)]), 'features'),
    (lambda: plot_reliability(z8), 'bins'),
    (lambda: MetricAccumulator(ks=(1, 0)), 'ks'),
    (lambda: MetricAccumulator(n_bins=0), 'n_bins'),
    (lambda: MetricAccumulator(T=0.0), 'T'),
    (lambda: MetricAccumulator(cka_samples=1.5), 'cka_samples'),
    (lambda: MetricAccumulator().compute(), 'update'),
    (lambda: MetricAccumulator().reliability(), 'update'),
    (lambda: MetricAccumulator().update(z8, y8[:3]), 'target'),
    (lambda: MetricAccumulator().update(z8, y8).update(torch.randn(8, 5), y8), 'logits'),
    (lambda: MetricAccumulator().update(z8, y8, teachers={'t': torch.randn(8, 5)}), "teachers['t']"),
    (lambda: MetricAccumulator().update(z8, y8, teachers=[z8]), 'teachers'),
    (lambda: MetricAccumulator().update(z8, y8, embedding=torch.randn(7, 2)), 'embedding'),
    (lambda: MetricAccumulator().update(z8, y8, embedding=torch.randn(8, 2), teacher_embeddings={'t': torch.randn(6, 2)}), 'teacher_embeddings'),
    (lambda: MetricAccumulator().update(z8, y8, embedding=torch.randn(8, 2)).update(z8, y8, embedding=torch.randn(8, 3)), 'embedding'),
    (lambda: MetricAccumulator().update(z8 * float('nan'), y8).compute(), 'logits'),
    (lambda: MetricAccumulator().update(z8, y8 - 5).compute(), 'target'),
    (lambda: MetricAccumulator().update(z8, y8, teachers={'t': z8 * float('nan')}).compute(), 'teachers'),
    (lambda: evaluate(None, [(z8, y8, y8)]), 'model_fn'),
    (lambda: evaluate(lambda x: x, [(z8, y8, y8)], teachers='bank'), 'teachers'),
    (lambda: evaluate(lambda x: x, [(z8, y8, y8)], teachers=lambda x, i: [x]), 'teachers'),
    (lambda: evaluate(lambda x: x, [(z8, y8)]), 'loader'),
    (lambda: evaluate(lambda x: x, []), 'loader'),
]

@pytest.mark.parametrize('fn,arg', BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_bad_input_names_argument(fn, arg):
    with pytest.raises(KdnbError, match=f"`{arg.replace('[', '.').replace(']', '.')}`"):
        fn()


# --- distributed reduction (2 CPU processes, gloo) -------------------------------------------------

def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    z, y, e, zt, et = make_stream()
    acc = MetricAccumulator(n_bins=6)
    for lo in range(rank * 50, 300, 100):                       # rank 0: 0-50, 100-150, ...; rank 1: 50-100, ...
        acc.update(z[lo:lo + 50], y[lo:lo + 50], teachers={'t': zt[lo:lo + 50]})
    r = acc.compute()
    if rank == 0: torch.save(r, out_file)
    dist.destroy_process_group()

def test_compute_reduces_over_gloo_processes():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, 'r.pt')
        mp.start_processes(_ddp_worker, args=(2, os.path.join(d, 'init'), out), nprocs=2, join=True, start_method='fork')
        r = torch.load(out)
    z, y, e, zt, et = make_stream()
    single = MetricAccumulator(n_bins=6).update(z, y, teachers={'t': zt}).compute()
    assert r['n'] == 300
    for k in ('top1', 'top5', 'ece'): assert r[k] == pytest.approx(single[k], abs=1e-9)
    assert r['teachers']['t'] == pytest.approx(single['teachers']['t'], rel=1e-6)


# --- GPU: no host sync per update ------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_update_has_no_host_sync_and_matches_cpu():
    z, y, e, zt, et = make_stream()
    acc = MetricAccumulator(n_bins=6, cka_samples=128)
    zc, yc, ec, ztc, etc_ = (t.cuda() for t in (z, y, e, zt, et))
    acc.update(zc[:10], yc[:10], teachers={'t': Taps(logits=ztc[:10], embedding=etc_[:10])}, embedding=ec[:10])   # allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for lo in range(10, 300, 50):
            acc.update(zc[lo:lo + 50], yc[lo:lo + 50], teachers={'t': Taps(logits=ztc[lo:lo + 50], embedding=etc_[lo:lo + 50])},
                       embedding=ec[lo:lo + 50])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    r = acc.compute()
    ref = MetricAccumulator(n_bins=6, cka_samples=128).update(z, y, teachers={'t': Taps(logits=zt, embedding=et)}, embedding=e).compute()
    for k in ('top1', 'top5', 'ece'): assert r[k] == pytest.approx(ref[k], abs=1e-5)
    assert r['teachers']['t'] == pytest.approx(ref['teachers']['t'], rel=1e-4)
