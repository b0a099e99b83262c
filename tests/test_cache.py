"TeacherCache: round trips (float32 exact, float16, top-k, features, views), rebuilds, resume, bad input."
import json
import numpy as np
import pytest
import torch
from kdnb.core import KdnbError
from kdnb.data import load_data, TensorLoader
from kdnb.teachers import TeacherBank, TEACHERS, load_teacher
from kdnb.data import sample_shifts
from kdnb.cache import TeacherCache, build_cache, _read_header, dense_from_topk, topk_logits

DIGITS = load_data('digits')


@pytest.fixture(scope='module')
def bank():
    return TeacherBank.from_zoo(data=DIGITS, taps=('logits',))


@pytest.fixture(scope='module')
def rich_bank():
    "Teachers with features, tokens, prefix and attention (the taps a feature/token KD method reads)."
    return TeacherBank({'resnet_t': load_teacher('resnet_t', DIGITS), 'vit_t': load_teacher('vit_t', DIGITS)}, data=DIGITS,
                       taps={'resnet_t': dict(taps=('logits', 'features'), feature_names=['layer2', 'layer3']),
                             'vit_t': dict(taps=('logits', 'embedding', 'tokens', 'prefix', 'attn'), attn_blocks=(-1,))})


def _chunk(cache, c, cs):
    return torch.as_tensor(cache.rows[c * cs:(c + 1) * cs])


def test_float32_round_trip_is_exact(tmp_path, rich_bank):
    cache = build_cache(rich_bank, DIGITS, tmp_path / 'c.kdc', dtype='float32', chunk_size=300, splits='val', progress=False)
    for c in range(2):
        idx = _chunk(cache, c, 300)
        online, served = rich_bank(DIGITS.normalize(DIGITS.images[idx])), cache.lookup(idx)
        for t in online:
            assert served[t].present() == online[t].present()
            for name in online[t].present():
                a, b = getattr(online[t], name), getattr(served[t], name)
                if isinstance(a, dict):
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                else: assert torch.equal(a, b), (t, name)
    # any other batch: equal up to float kernel differences
    x, y, idx = next(iter(TensorLoader(DIGITS, 'val', 37, shuffle=True, seed=1)))
    on, sv = rich_bank(x), cache[idx]
    torch.testing.assert_close(sv['vit_t'].attn['blocks.3'], on['vit_t'].attn['blocks.3'], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sv['resnet_t'].features['layer3'], on['resnet_t'].features['layer3'], rtol=1e-4, atol=1e-4)


def test_float16_is_the_rounded_online_output(tmp_path, rich_bank):
    cache = build_cache(rich_bank, DIGITS, tmp_path / 'h.kdc', dtype='float16', chunk_size=256, splits='test', progress=False)
    idx = _chunk(cache, 0, 256)
    online, served = rich_bank(DIGITS.normalize(DIGITS.images[idx])), cache.lookup(idx)
    for t in online:
        assert torch.equal(served[t].logits, online[t].logits.half().float())
    assert torch.equal(served['resnet_t'].features['layer2'], online['resnet_t'].features['layer2'].half().float())
    assert served['vit_t'].tokens.dtype == torch.float32
    c32 = build_cache(rich_bank, DIGITS, tmp_path / 'f.kdc', dtype='float32', splits='test', progress=False)
    assert cache.nbytes < 0.6 * c32.nbytes


def test_topk(tmp_path, bank):
    cache = build_cache(bank, DIGITS, tmp_path / 'k.kdc', topk=2, dtype='float32', splits='test', chunk_size=1000, progress=False)
    assert any(k.endswith('/logits/topv') for k in cache.header['arrays']) and not any(k.endswith('/logits') for k in cache.header['arrays'])
    idx = torch.as_tensor(cache.rows)
    online, served = bank(DIGITS.normalize(DIGITS.images[idx])), cache.lookup(idx)
    for t in TEACHERS:
        p, q = online[t].logits.softmax(-1), served[t].logits.softmax(-1)
        top = p.topk(2, -1).indices
        torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.sum(-1), torch.ones(len(idx)))
        assert torch.equal(q.argmax(-1), p.argmax(-1))


def test_topk_reconstruction_properties():
    g = torch.Generator().manual_seed(0)
    l = torch.randn(50, 7, generator=g) * 4
    for k in (1, 3, 6, 7):
        d = dense_from_topk(*topk_logits(l, k), 7)
        p, q = l.softmax(-1), d.softmax(-1)
        top = p.topk(k, -1).indices
        torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), rtol=1e-5, atol=1e-6)
        if k < 7:  # the tail is uniform and carries the missing mass
            mask = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top, False)
            tail = q[mask].reshape(50, 7 - k)
            torch.testing.assert_close(tail, tail[:, :1].expand_as(tail))
            torch.testing.assert_close(tail.sum(-1), p[mask].reshape(50, 7 - k).sum(-1), rtol=1e-5, atol=1e-6)


def test_views_store_augmentation_and_replay_it(tmp_path, bank):
    cache = build_cache(bank, DIGITS, tmp_path / 'v.kdc', views=3, max_shift=2, aug_seed=4, dtype='float32', splits='val', progress=False)
    h = cache.header
    assert h['spec']['transform'] == dict(normalize='(x/255 - mean) / std', augmentation='shift', views=3, max_shift=2, aug_seed=4)
    stored = np.asarray(cache._arr['aug'])
    assert np.array_equal(stored, sample_shifts(len(cache) * 3, 2, torch.Generator().manual_seed(4)).numpy())
    x, y, idx = next(iter(TensorLoader(DIGITS, 'val', 40, shuffle=True, seed=2)))
    seen = []
    for epoch in range(3):
        cache.set_epoch(epoch)
        xa = cache.augment(x, idx)
        seen.append(xa)
        torch.testing.assert_close(cache.lookup(idx)['vit_t'].logits, bank(xa)['vit_t'].logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(seen[0], seen[1])
    cache.set_epoch(3); assert torch.equal(cache.augment(x, idx), seen[0])


def test_header_fingerprints_teachers_data_taps_transform(tmp_path, bank):
    cache = build_cache(bank, DIGITS, tmp_path / 'h.kdc', splits='val', progress=False)
    s = cache.spec
    assert s['data']['fingerprint'] == DIGITS.fingerprint
    for t in TEACHERS:
        assert s['teachers'][t]['weights'] == bank.spec()[t]['weights'] and s['teachers'][t]['taps'] == ['logits']
    assert s['transform']['augmentation'] == 'none' and s['storage'] == dict(dtype='float16', topk=None)


def test_truncated_file_is_detected_and_rebuilt(tmp_path, bank, capsys):
    p = tmp_path / 't.kdc'
    build_cache(bank, DIGITS, p, splits='val', progress=False)
    with open(p, 'r+b') as f: f.truncate(p.stat().st_size - 100)
    with pytest.raises(KdnbError, match='truncated'): TeacherCache(p)
    c = build_cache(bank, DIGITS, p, splits='val', progress=False)
    assert 'rebuilding (truncated' in capsys.readouterr().out
    idx = torch.as_tensor(c.rows[:20])
    assert torch.equal(c[idx]['resnet_t'].logits, bank(DIGITS.normalize(DIGITS.images[idx]))['resnet_t'].logits.half().float())
    # a file cut inside its header is refused too
    p.write_bytes(p.read_bytes()[:12])
    with pytest.raises(KdnbError, match='unreadable header'): TeacherCache(p)


def test_changed_teacher_taps_or_data_rebuild(tmp_path, bank, capsys):
    p = tmp_path / 'c.kdc'
    build_cache(bank, DIGITS, p, splits='val', progress=False)
    capsys.readouterr()
    other = TeacherBank({**bank.teachers, 'vit_t': load_teacher('vit_s', DIGITS)}, data=DIGITS)
    c = build_cache(other, DIGITS, p, splits='val', progress=False)
    out = capsys.readouterr().out
    assert 'spec changed: teachers.vit_t.arch' in out and 'teachers.vit_t.weights' in out
    idx = torch.as_tensor(c.rows[:10])
    assert torch.equal(c[idx]['vit_t'].logits, other(DIGITS.normalize(DIGITS.images[idx]))['vit_t'].logits.half().float())
    build_cache(TeacherBank(other.teachers, taps=('logits', 'embedding'), data=DIGITS), DIGITS, p, splits='val', progress=False)
    assert 'teachers.resnet_t.taps' in capsys.readouterr().out
    d2 = load_data('digits', seed=1)
    build_cache(TeacherBank(other.teachers, data=d2), d2, p, splits='val', progress=False)
    assert 'data.fingerprint' in capsys.readouterr().out
    build_cache(TeacherBank(other.teachers, data=d2), d2, p, splits='val', progress=False)
    assert capsys.readouterr().out == ''                     # valid: opened as it is


def test_flipped_byte_is_detected(tmp_path, bank, capsys):
    p = tmp_path / 'b.kdc'
    c = build_cache(bank, DIGITS, p, splits='val', progress=False)
    off = c.header['arrays']['convnext_t/logits']['offset']
    with open(p, 'r+b') as f: f.seek(off + 3); b = f.read(1); f.seek(off + 3); f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(KdnbError, match='checksum of convnext_t/logits'): TeacherCache(p)
    build_cache(bank, DIGITS, p, splits='val', progress=False)
    assert 'rebuilding (corrupt' in capsys.readouterr().out


class _Stopping:
    def __init__(self, bank, n): self.bank, self.n, self.calls = bank, n, 0
    def spec(self): return self.bank.spec()
    def __call__(self, x):
        self.calls += 1
        if self.calls > self.n: raise KeyboardInterrupt
        return self.bank(x)


def test_interrupted_build_resumes(tmp_path, bank, capsys):
    p = tmp_path / 'r.kdc'
    assert len(DIGITS.splits['val']) == 270                     # 3 chunks of at most 100 rows
    with pytest.raises(KeyboardInterrupt):                       # 1 probe forward + 2 chunks, then stop
        build_cache(_Stopping(bank, 3), DIGITS, p, chunk_size=100, splits='val', progress=False)
    part = p.with_name('r.kdc.part')
    assert not p.exists() and _read_header(part)['chunks_done'] == [0, 1]
    with pytest.raises(KdnbError, match='incomplete'): TeacherCache(part)
    counting = _Stopping(bank, 10**6)
    c = build_cache(counting, DIGITS, p, chunk_size=100, splits='val', progress=False)
    assert 'resuming an interrupted build (2 of 3 chunks done)' in capsys.readouterr().out
    assert counting.calls == 1                                   # only the missing chunk
    fresh = build_cache(bank, DIGITS, tmp_path / 'f.kdc', chunk_size=100, splits='val', progress=False)
    idx = torch.as_tensor(c.rows)
    for t in TEACHERS: assert torch.equal(c[idx][t].logits, fresh[idx][t].logits)
    assert not part.exists()


def test_serves_teacher_source_of_the_loop(tmp_path, bank):
    distill = pytest.importorskip('kdnb.distill')
    c = build_cache(bank, DIGITS, tmp_path / 's.kdc', splits='train', progress=False)
    src = distill.TeacherSource(c)
    x, y, idx = next(iter(TensorLoader(DIGITS, 'train', 16)))
    out = src(x, idx)
    assert set(out) == set(TEACHERS) and src.forwards == 0


def test_bad_input_names_the_argument(tmp_path, bank):
    c = build_cache(bank, DIGITS, tmp_path / 'x.kdc', splits='train', progress=False)
    n = len(DIGITS.images)
    for bad in (torch.tensor([0, n]), torch.tensor([-1]), torch.tensor([[1, 2]]),
                torch.as_tensor(DIGITS.splits['test'][:3])):
        with pytest.raises(KdnbError, match='`idx`'): c.lookup(bad)
    with pytest.raises(KdnbError, match='`view`'): c.lookup(torch.as_tensor(DIGITS.splits['train'][:3]), view=1)
    with pytest.raises(KdnbError, match='`dtype`'): build_cache(bank, DIGITS, tmp_path / 'y.kdc', dtype='bfloat16')
    with pytest.raises(KdnbError, match='`topk`'): build_cache(bank, DIGITS, tmp_path / 'y.kdc', topk=0)
    with pytest.raises(KdnbError, match='`views`'): build_cache(bank, DIGITS, tmp_path / 'y.kdc', views=-1)
    with pytest.raises(KdnbError, match='`splits`'): build_cache(bank, DIGITS, tmp_path / 'y.kdc', splits='holdout')
    with pytest.raises(KdnbError, match='`bank`'): build_cache(object(), DIGITS, tmp_path / 'y.kdc')
    with pytest.raises(KdnbError, match='`path`'): TeacherCache(tmp_path / 'missing.kdc')


def test_default_path_and_no_import_cycle(tmp_path, bank, monkeypatch):
    import subprocess, sys
    code = "import sys, kdnb.teachers; assert 'kdnb.cache' not in sys.modules; import kdnb.cache; assert not hasattr(kdnb.teachers, 'build_cache')"
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0       # cache -> teachers only, never back
    monkeypatch.setenv('KDNB_DATA', str(tmp_path))
    c = build_cache(bank, DIGITS, splits='val', topk=3, progress=False)
    assert c.path == tmp_path / 'cache' / 'digits-resnet_t+vit_t+convnext_t-val-float16-top3.kdc'
    assert c.names == list(TEACHERS)                       # the bank's order, not the header's sorted keys
    v = build_cache(bank, DIGITS, splits='val', views=2, progress=False)
    assert v.path.name == 'digits-resnet_t+vit_t+convnext_t-val-float16-v2s2a0.kdc' and c.path.exists()


def test_ranks_build_their_own_shards_of_one_file(tmp_path, bank):
    "Rank 0 of 2 writes only its chunks (then gives up waiting); rank 1 writes the rest and publishes; equal to a one-process build."
    p = tmp_path / 'r.kdc'
    with pytest.raises(KdnbError, match='`wait_s`'):
        build_cache(bank, DIGITS, p, splits='val', chunk_size=32, progress=False, rank=0, world_size=2, wait_s=0.3)
    n_chunks = -(-len(DIGITS.splits['val']) // 32)
    assert json.loads((tmp_path / 'r.kdc.part.rank0').read_text()) == list(range(0, n_chunks, 2)) and not p.exists()
    two = build_cache(bank, DIGITS, p, splits='val', chunk_size=32, progress=False, rank=1, world_size=2)
    assert not list(tmp_path.glob('r.kdc.part*')) and TeacherCache(p).header['complete']        # checksums verified on open
    one = build_cache(bank, DIGITS, tmp_path / 'one.kdc', splits='val', chunk_size=32, progress=False)
    idx = torch.as_tensor(DIGITS.splits['val'])
    for t in bank.names: assert torch.equal(one.lookup(idx)[t].logits, two.lookup(idx)[t].logits)
    with pytest.raises(KdnbError, match='`rebuild`'): build_cache(bank, DIGITS, p, splits='val', rebuild=True, rank=0, world_size=2)
