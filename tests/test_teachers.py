"The committed teacher zoo, checkpoint validation and retraining (in temp dirs only), TeacherBank."
import hashlib, json, shutil
from pathlib import Path
import pytest
import torch
from kdnb.core import KdnbError
from kdnb.data import load_data, TensorLoader
from kdnb.models import create_model, weights_hash
from kdnb.teachers import (ZOO, TEACHERS, STUDENTS, teachers_dir, check_checkpoint, train_teachers, load_teacher,
                           TeacherBank, accuracy)
from kdnb.data import sample_shifts, shift_images

DIGITS = load_data('digits')
META_KEYS = {'arch', 'timm_name', 'data_fingerprint', 'seed', 'val_acc', 'test_acc', 'weights_hash', 'file_sha256', 'recipe'}


def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob('*')) if p.is_file()}


@pytest.fixture(scope='module', autouse=True)
def committed_checkpoints_untouched():
    before = _snapshot(teachers_dir())
    yield
    assert _snapshot(teachers_dir()) == before, 'a test rewrote the committed checkpoints'


@pytest.fixture
def scratch(tmp_path):
    "A temp copy of the committed resnet_s checkpoint (the cheapest member to retrain)."
    for ext in ('safetensors', 'json'): shutil.copy(teachers_dir() / f'resnet_s.{ext}', tmp_path)
    return tmp_path


def test_committed_checkpoints_are_valid_small_and_described():
    total = 0
    for n, e in ZOO.items():
        model, why = check_checkpoint(n, e, DIGITS)
        assert model is not None, (n, why)
        meta = json.loads((teachers_dir() / f'{n}.json').read_text())
        assert META_KEYS <= set(meta)
        assert meta['data_fingerprint'] == DIGITS.fingerprint and meta['arch'] == e.arch and meta['seed'] == 0
        assert weights_hash(model) == meta['weights_hash']
        size = (teachers_dir() / f'{n}.safetensors').stat().st_size
        assert size < 5 * 2**20, (n, size)
        total += size
        assert accuracy(model, DIGITS, 'test') == pytest.approx(meta['test_acc'], abs=0.01)
    assert total < 20 * 2**20


def test_three_families_and_each_teacher_beats_every_student_alone():
    from kdnb.models import ARCHS
    fams = {ARCHS[ZOO[t].arch]['timm_name'].split('_')[0] for t in TEACHERS}
    assert fams == {'resnet18', 'vit', 'convnext'}
    assert {ZOO[s].arch for s in STUDENTS} == {'resnet_s', 'vit_s'}
    acc = {n: json.loads((teachers_dir() / f'{n}.json').read_text())['test_acc'] for n in ZOO}
    for t in TEACHERS:
        for s in STUDENTS: assert acc[t] >= acc[s] + 0.02, (t, acc[t], s, acc[s])


def test_train_teachers_reuses_valid(scratch, capsys):
    df = train_teachers(['resnet_s'], DIGITS, folder=scratch)
    assert df.loc['resnet_s', 'status'] == 'reused' and 'training' not in capsys.readouterr().out


@pytest.mark.parametrize('damage,why', [
    (lambda d: (d / 'resnet_s.safetensors').write_bytes((d / 'resnet_s.safetensors').read_bytes()[:5000]), 'corrupt'),
    (lambda d: _flip_last_byte(d / 'resnet_s.safetensors'), 'corrupt'),
    (lambda d: (d / 'resnet_s.json').write_text('{not json'), 'unreadable'),
    (lambda d: (d / 'resnet_s.safetensors').unlink(), 'no checkpoint'),
    (lambda d: _edit_meta(d, seed=7), 'stale: seed'),
    (lambda d: _edit_meta(d, data_fingerprint='0' * 16), 'stale: data_fingerprint'),
    (lambda d: _edit_meta(d, arch='vit_s'), 'stale: arch'),
    (lambda d: _edit_meta(d, weights_hash='f' * 16), 'weights hash'),
])
def test_stale_or_corrupt_is_retrained_with_reason(scratch, capsys, damage, why):
    damage(scratch)
    m, reason = check_checkpoint('resnet_s', ZOO['resnet_s'], DIGITS, folder=scratch)
    assert m is None and why in reason, reason
    df = train_teachers(['resnet_s'], DIGITS, folder=scratch, epochs=1, progress=False)
    out = capsys.readouterr().out
    assert df.loc['resnet_s', 'status'] == 'trained' and 'resnet_s: training' in out
    # the retrained checkpoint (1 epoch) is valid for that recipe, and stale for the zoo recipe
    assert train_teachers(['resnet_s'], DIGITS, folder=scratch, epochs=1).loc['resnet_s', 'status'] == 'reused'
    assert 'stale: recipe' in check_checkpoint('resnet_s', ZOO['resnet_s'], DIGITS, folder=scratch)[1]


def _flip_last_byte(p: Path):
    b = bytearray(p.read_bytes()); b[-1] ^= 0xFF; p.write_bytes(bytes(b))


def _edit_meta(d: Path, **kw):
    p = d / 'resnet_s.json'; meta = json.loads(p.read_text()); meta.update(kw); p.write_text(json.dumps(meta))


def test_other_data_is_stale():
    other = load_data('digits', seed=1)
    m, why = check_checkpoint('resnet_s', ZOO['resnet_s'], other)
    assert m is None and 'data_fingerprint' in why


def test_progress_bar(scratch, capsys):
    (scratch / 'resnet_s.json').unlink()
    train_teachers(['resnet_s'], DIGITS, folder=scratch, epochs=1, progress=True)
    assert 'resnet_s' in capsys.readouterr().err      # tqdm writes its bar to stderr


def test_load_teacher_without_training_names_the_argument(tmp_path):
    with pytest.raises(KdnbError, match='`train`'): load_teacher('vit_t', DIGITS, folder=tmp_path, train=False)
    with pytest.raises(KdnbError, match='`name`'): load_teacher('bert', DIGITS)
    with pytest.raises(KdnbError, match='`names`'): train_teachers(['bert'], DIGITS)
    with pytest.raises(KdnbError, match='`epochs`'): train_teachers(['resnet_s'], DIGITS, epochs=0)


def test_bank_is_frozen_and_answers_with_taps():
    bank = TeacherBank.from_zoo(data=DIGITS, taps=('logits', 'embedding'))
    x, y, idx = next(iter(TensorLoader(DIGITS, 'test', 50)))
    out = bank(x)
    assert list(out) == list(TEACHERS) == bank.names
    for n, t in out.items():
        m = bank[n]
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert t.logits.is_inference() and t.embedding.shape[0] == 50
        assert torch.equal(t.logits, m.model(x))
        assert (t.logits.argmax(1) == y).float().mean() >= 0.9
    spec = bank.spec()
    assert set(spec) == set(TEACHERS) and all(len(s['weights']) == 16 for s in spec.values())


def test_bank_bf16_autocast_returns_float32():
    bank = TeacherBank.from_zoo(['resnet_t'], DIGITS, bf16=True)
    x, y, _ = next(iter(TensorLoader(DIGITS, 'test', 64)))
    a = bank(x)['resnet_t'].logits
    ref = TeacherBank.from_zoo(['resnet_t'], DIGITS, bf16=False)(x)['resnet_t'].logits
    assert a.dtype == torch.float32 and not torch.equal(a, ref)
    assert (a.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_bank_num_classes_mismatch_names_the_argument():
    five = create_model('resnet_s', 5, 1)
    with pytest.raises(KdnbError, match='`teachers`') as e: TeacherBank({'a': create_model('resnet_s', 10, 1), 'b': five}, data=DIGITS)
    assert 'num_classes' in str(e.value)
    with pytest.raises(KdnbError, match='`teachers`'): TeacherBank({'b': five}, num_classes=10)
    with pytest.raises(KdnbError, match='`teachers`'): TeacherBank([five])
    with pytest.raises(KdnbError, match='`taps`'): TeacherBank({'b': five}, taps={'c': ('logits',)})
    with pytest.raises(KdnbError, match='`taps`'): TeacherBank({'b': five}, taps=('tokens',))


def test_shifts_are_replayable():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1, s2 = sample_shifts(64, 2, g1), sample_shifts(64, 2, g2)
    assert torch.equal(s1, s2)
    x = torch.randn(64, 1, 32, 32)
    assert torch.equal(shift_images(x, s1), shift_images(x, s2))
    back = shift_images(shift_images(x, s1), -s1)
    assert torch.equal(back[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])    # the interior survives a shift and its inverse
