"""Research scale end to end: a fabricated CIFAR-100 and ImageFolder tree, two randomly initialised timm teachers of
different families with different input configs saved to local files, the research template through papermill."""
import json
import pytest
import torch
from kdnb.core import KdnbError
from kdnb.data import write_fake_cifar, write_fake_imagefolder, load_data, Augmentation, StreamLoader
from kdnb.models import create_model, save_weights, InputConfig
from kdnb.teachers import TeacherBank, TeacherSpec, load_spec_teacher
from kdnb.cache import build_cache
from kdnb.runs import run


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "CIFAR-100 (2 train + 1 test images per class), a 3-class JPEG tree, a ResNet and a ViT teacher as local files."
    d = tmp_path_factory.mktemp('research')
    write_fake_cifar(d / 'cifar', 'cifar100', n_per_batch=200, n_test=100)
    write_fake_imagefolder(d / 'pets', ('cat', 'dog', 'owl'), n=5, size=40, ext='.jpg')
    torch.manual_seed(0)
    save_weights(create_model('resnet10t', 100, 3), d / 'res.safetensors')        # ImageNet statistics (timm's config), 40 px
    (d / 'res.json').write_text(json.dumps({'input': {'size': 40}}))
    save_weights(create_model('vit_tiny_patch16_224', 100, 3, img_size=48), d / 'vit.safetensors')   # mean = std = 0.5, 48 px
    (d / 'vit.json').write_text(json.dumps({'input': {'size': 48, 'mean': [0.5] * 3, 'std': [0.5] * 3}, 'kwargs': {'img_size': 48}}))
    return d


def _specs(d): return [f'res=resnet10t@{d}/res.safetensors', f'vit=vit_tiny_patch16_224@{d}/vit.safetensors']


def test_research_template_cifar100_cached_views(world, tmp_path, monkeypatch):
    monkeypatch.setenv('IN_TEST', '1'); monkeypatch.setenv('KDNB_DATA', str(world / 'kd'))
    m = run('research', dict(dataset='cifar100', data_root=str(world / 'cifar'), teachers=_specs(world), student='resnet_s',
                             cached=True, cache_views=2, batch_size=16, budget_steps=3, workers=0, baseline=True, device='cpu'),
            tmp_path / 'r', progress=False)
    assert m['dataset'] == 'cifar100' and m['cached'] and m['augment']['policy'] == 'pad_crop_flip'
    assert m['teacher:res']['input']['size'] == 40 and m['teacher:vit']['input']['mean'] == [0.5] * 3
    for k in ('kd', 'alone'):
        assert 0 <= m[k]['test_acc'] <= 1 and m[k]['compute']['steps'] == 3, k
    assert m['kd']['compute']['teacher_forwards'] == 0                       # served from the cache of views
    assert (tmp_path / 'r' / 'teachers.kdc').exists() and (tmp_path / 'r' / 'research.html').exists()


def test_research_template_imagefolder_finetuned_online_mixup(world, tmp_path, monkeypatch):
    monkeypatch.setenv('IN_TEST', '1'); monkeypatch.setenv('KDNB_DATA', str(world / 'kd'))
    m = run('research', dict(dataset='imagefolder', data_root=str(world / 'pets'), teachers=_specs(world), student='resnet_s',
                             image_size=32, augment='rrc_flip', mixup=0.2, cached=False, batch_size=4, budget_steps=2,
                             workers=0, baseline=False, device='cpu'), tmp_path / 'r', progress=False)
    assert m['kd']['compute']['steps'] == 2 and m['kd']['compute']['teacher_forwards'] > 0     # online teachers
    for t in ('res', 'vit'):                                                 # 100-class teachers got a 3-class head
        spec = next(s for s in m['teachers'] if s['name'] == t)
        assert json.loads(open(spec['weights'].replace('.safetensors', '.json')).read())['num_classes'] == 3
        assert 0 <= m[f'teacher:{t}']['test_acc'] <= 1


def test_one_batch_each_teacher_its_own_input(world):
    "A ViT (mean/std 0.5, 224 px) and a ResNet (ImageNet statistics, 160 px) receive exactly their configs' inputs from one batch."
    torch.manual_seed(0)
    vit = create_model('vit_tiny_patch16_224', 10, 3, depth=1).with_input(InputConfig(224, (0.5,) * 3, (0.5,) * 3))
    res = create_model('resnet10t', 10, 3).with_input(InputConfig(160))
    bank = TeacherBank({'vit': vit, 'res': res})
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    seen = {}
    for k in ('vit', 'res'): bank[k].model.register_forward_pre_hook(lambda mod, a, k=k: seen.__setitem__(k, a[0].clone()))
    bank(x)
    f = x.float() / 255
    up = lambda s: torch.nn.functional.interpolate(f, size=(s, s), mode='bicubic' if False else 'bilinear', align_corners=False)
    assert torch.allclose(seen['vit'], (up(224) - 0.5) / 0.5, atol=1e-5)
    m, s = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen['res'], (up(160) - m) / s, atol=1e-5)


def test_cached_view_is_the_students_view(world, monkeypatch):
    monkeypatch.setenv('KDNB_DATA', str(world / 'kd'))
    data = load_data('cifar100', world / 'cifar', stream=True, workers=0, augment=Augmentation('rrc_flip', scale=(0.3, 1.0)))
    bank = TeacherBank.from_specs(_specs(world), data)
    cache = build_cache(bank, data, world / 'views.kdc', splits='train', views=2, dtype='float32', progress=False)
    assert cache.spec['transform']['augmentation'] == 'crop_flip' and data.views_from_cache
    dl = StreamLoader(data, 'train', 8, workers=0)
    x, y, i = next(iter(dl))
    assert torch.equal(x, data.images[i])                                    # unaugmented: the cache owns the views
    for ep in (0, 1):
        cache.set_epoch(ep)
        xv = cache.augment(x, i)
        assert not torch.allclose(xv, x.float() / 255)
        on = bank(xv)
        for t in ('res', 'vit'): assert torch.allclose(on[t].logits, cache.lookup(i)[t].logits, atol=1e-4)


# ---------------------------------------------------------------- bad input, each before any tensor math
def test_teacher_weights_missing_or_of_another_architecture(world):
    data = load_data('cifar100', world / 'cifar', stream=True, workers=0)
    with pytest.raises(KdnbError, match='`weights`') as e: load_spec_teacher(f'r=resnet10t@{world}/nope.safetensors', data)
    assert 'nope.safetensors' in str(e.value)
    with pytest.raises(KdnbError, match='`weights`.*another architecture') as e: load_spec_teacher(f'r=resnet18@{world}/res.safetensors', data)
    assert 'resnet18' in str(e.value)


def test_logit_teacher_class_count_without_head(world):
    data = load_data('imagefolder', world / 'pets', stream=True, workers=0)
    with pytest.raises(KdnbError, match='`teachers`') as e: TeacherBank.from_specs(_specs(world)[:1], data)
    assert '100 logits' in str(e.value) and '3' in str(e.value) and 'finetune' in str(e.value)


def test_feature_teacher_refused_by_a_logit_loss(world):
    data = load_data('imagefolder', world / 'pets', stream=True, workers=0)
    with pytest.raises(KdnbError, match='`taps`.*features only'): TeacherBank.from_specs([_specs(world)[1] + '#features'], data)
    fb = TeacherBank.from_specs([_specs(world)[1] + '#features'], data, taps=('embedding',))
    assert fb(data.images[[0, 1]])['vit'].embedding.shape == (2, 192)


def test_image_size_the_model_cannot_take(world):
    bad = TeacherSpec('vit', 'vit_tiny_patch16_224', f'{world}/vit.safetensors', input={'size': 40, 'mean': [0.5] * 3, 'std': [0.5] * 3},
                      kwargs={'img_size': 48})
    with pytest.raises(KdnbError, match='`img_size`') as e: load_spec_teacher(bad)
    assert '40' in str(e.value)
    with pytest.raises(KdnbError, match='`img_size`'): create_model('resnet10t', 10, 3).with_input(InputConfig(16))


def test_corrupt_image_is_fatal_naming_the_file_or_skipped(tmp_path):
    root = write_fake_imagefolder(tmp_path / 'p', ('a', 'b', 'c'), n=5, size=24, ext='.jpg')
    (root / 'b' / '3.jpg').write_bytes(b'not a jpeg at all')
    data = load_data('imagefolder', root, stream=True, workers=0)
    with pytest.raises(KdnbError, match="`root`.*3.jpg"):                  # fatal, at the first read of that file
        row = data.images.files.index(str(root / 'b' / '3.jpg'))
        split = next(s for s, idx in data.splits.items() if row in set(idx.tolist()) and s != 'train') if row not in set(data.splits['train'].tolist()) else 'train'
        for _ in StreamLoader(data, split, 20, shuffle=False, augment=False): pass
    with pytest.raises(KdnbError, match='3.jpg'): load_data('imagefolder', root, stream=False)
    ok = load_data('imagefolder', root, stream=True, workers=0, bad_images='skip')
    assert ok.skipped == [str(root / 'b' / '3.jpg')] and len(ok.images) == 14


def test_cache_of_another_policy_or_preprocessing_is_rebuilt(world, monkeypatch, capsys):
    data = load_data('cifar100', world / 'cifar', stream=True, workers=0)
    bank = TeacherBank.from_specs(_specs(world), data)
    p = world / 'policy.kdc'
    a = build_cache(bank, data, p, splits='val', views=1, augment=Augmentation('pad_crop_flip'), progress=False)
    b = build_cache(bank, data, p, splits='val', views=1, augment=Augmentation('rrc_flip'), progress=False)
    assert 'spec changed: transform.crop' in capsys.readouterr().out and b.spec['transform']['crop']['policy'] == 'rrc_flip'
    other = TeacherBank({'res': bank['res'].with_input(InputConfig(32)), 'vit': bank['vit']})
    c = build_cache(other, data, p, splits='val', views=1, augment=Augmentation('rrc_flip'), progress=False)
    assert 'teachers.res.input.size' in capsys.readouterr().out and c.spec['teachers']['res']['input']['size'] == 32
    assert b.check(c.spec) != []


def test_mixup_with_cached_targets_is_refused(world):
    data = load_data('cifar100', world / 'cifar', stream=True, workers=0, augment=Augmentation('rrc_flip', mixup=0.2))
    bank = TeacherBank.from_specs(_specs(world), data)
    with pytest.raises(KdnbError, match='`augment`.*mixup'): build_cache(bank, data, world / 'mix.kdc', splits='val', progress=False)
    with pytest.raises(KdnbError, match='`cached`.*mixup'): Augmentation('rrc_flip', cutmix=1.0).check_cached('cached')   # the template's check
    with pytest.raises(KdnbError, match='`augment`.*auto_augment'):
        build_cache(bank, data, world / 'mix.kdc', splits='val', augment=Augmentation('rrc_flip', auto_augment='rand-m9-mstd0.5'), progress=False)


def test_splits_never_miss_a_class(tmp_path):
    root = write_fake_imagefolder(tmp_path / 'few', ('a', 'b', 'c'), n=5, size=16)
    d = load_data('imagefolder', root, stream=False)
    for s, idx in d.splits.items(): assert sorted(set(d.labels[idx].tolist())) == [0, 1, 2], s
    tiny = write_fake_imagefolder(tmp_path / 'tiny', ('a', 'b'), n=2, size=16)
    with pytest.raises(KdnbError, match="`splits`.*'test'") as e: load_data('imagefolder', tiny)
    assert "'a': 2" in str(e.value)


def test_cli_teachers_finetune(world, tmp_path, capsys):
    from kdnb.runs import main
    rc = main(['teachers', 'finetune', '-p', 'teacher', _specs(world)[0], '-p', 'dataset', 'imagefolder', '-p', 'root', str(world / 'pets'),
               '-p', 'epochs', '2', '-p', 'workers', '0', '-p', 'out', str(tmp_path / 'r3.safetensors'), '-p', 'device', 'cpu'])
    assert rc == 0 and f"res=resnet10t@{tmp_path / 'r3.safetensors'}" in capsys.readouterr().out
    assert json.loads((tmp_path / 'r3.json').read_text())['num_classes'] == 3
    assert main(['teachers', 'finetune', '-p', 'teacher', f'x=resnet10t@{tmp_path}/none.safetensors', '-p', 'dataset', 'imagefolder',
                 '-p', 'root', str(world / 'pets'), '-p', 'workers', '0']) == 2          # a KdnbError, printed
