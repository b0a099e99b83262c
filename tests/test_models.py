"Taps of every zoo configuration, attention against an unfused reference, local weights, bad input."
import copy
import pytest
import torch
import timm
from kdnb.core import KdnbError, seed_everything
from kdnb.models import (ARCHS, TapModel, create_model, available_taps, full_taps_model, tap_shapes,
                         unfused_attention_reference, save_weights, weights_hash, attention_probs)

B = 3
X = torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(0))

# The documented shapes (B x 1 x 32 x 32 input, 10 classes), every tap on, attention of every block.
EXPECTED = {
    'resnet_t': {'logits': (B, 10), 'embedding': (B, 128), 'features.act1': (B, 64, 16, 16), 'features.layer1': (B, 32, 8, 8),
                 'features.layer2': (B, 64, 4, 4), 'features.layer3': (B, 96, 2, 2), 'features.layer4': (B, 128, 1, 1)},
    'resnet_s': {'logits': (B, 10), 'embedding': (B, 32), 'features.act1': (B, 8, 16, 16), 'features.layer1': (B, 4, 8, 8),
                 'features.layer2': (B, 8, 4, 4), 'features.layer3': (B, 16, 2, 2), 'features.layer4': (B, 32, 1, 1)},
    'convnext_t': {'logits': (B, 10), 'embedding': (B, 128), 'features.stages.0': (B, 32, 8, 8),
                   'features.stages.1': (B, 64, 4, 4), 'features.stages.2': (B, 96, 2, 2), 'features.stages.3': (B, 128, 1, 1)},
    'vit_t': {'logits': (B, 10), 'embedding': (B, 64), **{f'features.blocks.{i}': (B, 64, 8, 8) for i in range(4)},
              'tokens': (B, 64, 64), 'prefix': (B, 1, 64), **{f'attn.blocks.{i}': (B, 2, 65, 65) for i in range(4)}},
    'vit_s': {'logits': (B, 10), 'embedding': (B, 32), **{f'features.blocks.{i}': (B, 32, 8, 8) for i in range(2)},
              'tokens': (B, 64, 32), 'prefix': (B, 1, 32), **{f'attn.blocks.{i}': (B, 2, 65, 65) for i in range(2)}},
    'mixer_t': {'logits': (B, 10), 'embedding': (B, 96), **{f'features.blocks.{i}': (B, 96, 8, 8) for i in range(4)},
                'tokens': (B, 64, 96)},
}


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_tap_shapes_documented(arch):
    assert tap_shapes(full_taps_model(arch), X) == EXPECTED[arch]


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_logits_and_embedding_match_timm(arch):
    seed_everything(0)
    m = full_taps_model(arch).eval()
    with torch.no_grad():
        ref = m.model(X)
        out = m(X)
        torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.model.get_classifier()(out.embedding), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(m.with_taps('logits')(X).logits, ref)


def _tiny_vit(**kw):
    return create_model('vit_tiny_patch16_224', 10, 1, img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=4, **kw)


@pytest.mark.parametrize('make', [lambda: create_model('vit_t', 10, 1), lambda: create_model('vit_s', 10, 1),
                                  lambda: _tiny_vit(qk_norm=True), lambda: _tiny_vit(reg_tokens=4, class_token=True)],
                         ids=['vit_t', 'vit_s', 'qk_norm', 'registers'])
def test_attention_rows_sum_to_one_and_match_unfused(make):
    seed_everything(1)
    m = make().eval()
    # perturb the qk-norm weights so a wrong hook point would show
    for n, p in m.model.named_parameters():
        if 'q_norm' in n or 'k_norm' in n:
            with torch.no_grad(): p.add_(torch.randn_like(p) * 0.3)
    n = len(m.model.blocks)
    tm = m.with_taps(('logits', 'attn'), attn_blocks=list(range(n)))
    with torch.no_grad():
        out = tm(X)
        for b in range(n):
            a = out.attn[f'blocks.{b}']
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=0, atol=1e-5)
            assert (a >= 0).all()
            torch.testing.assert_close(a, unfused_attention_reference(tm.model, X, b), rtol=1e-5, atol=1e-6)
        assert all(blk.attn.fused_attn for blk in tm.model.blocks)      # the model itself still runs fused
        torch.testing.assert_close(out.logits, tm.model(X))


def test_registers_are_prefix_tokens():
    m = _tiny_vit(reg_tokens=4, class_token=True).with_taps(('tokens', 'prefix', 'attn'))
    out = m(X)
    assert out.prefix.shape == (B, 5, 48) and out.tokens.shape == (B, 16, 48)
    assert out.attn['blocks.2'].shape == (B, 4, 21, 21)
    full = m.model.forward_features(X)
    assert torch.equal(torch.cat([out.prefix, out.tokens], 1), full)


def test_attention_probs_formula():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    ref = torch.softmax(torch.einsum('bhid,bhjd->bhij', q, k) / 2.0, -1)
    torch.testing.assert_close(attention_probs(q, k, 0.5), ref)


def test_intermediate_features_equal_the_module_outputs():
    m = create_model('vit_t', 10, 1).eval()
    got = {}
    h = m.model.blocks[1].register_forward_hook(lambda mod, i, o: got.__setitem__('b1', o))
    with torch.no_grad(): f = m.with_taps('features', feature_names=['blocks.1'])(X).features['blocks.1']
    h.remove()
    ref = got['b1'][:, 1:].reshape(B, 8, 8, 64).permute(0, 3, 1, 2)
    assert torch.equal(f, ref)
    r = create_model('resnet_t', 10, 1).eval()
    with torch.no_grad():
        a = r.with_taps('features', feature_names=['layer3'])(X).features['layer3']     # forward_intermediates
        b = r.with_taps('features', feature_names=['layer3.0'])(X).features['layer3.0']  # hook (layer3 has one block)
    assert torch.equal(a, b)


def test_only_requested_taps_are_computed(monkeypatch):
    m = create_model('resnet_t', 10, 1).eval()
    def boom(*a, **k): raise AssertionError('forward_intermediates called for a logits-only model')
    monkeypatch.setattr(m.model, 'forward_intermediates', boom)
    with torch.no_grad(): out = m(X)
    assert out.present() == ['logits']
    v = create_model('vit_t', 10, 1, taps=('features',), feature_names=['blocks.0']).eval()
    ran = []
    for i, blk in enumerate(v.model.blocks): blk.register_forward_hook(lambda *a, i=i: ran.append(i))
    head = []
    v.model.head.register_forward_hook(lambda *a: head.append(1))
    with torch.no_grad(): out = v(X)
    assert ran == [0] and head == [] and out.present() == ['features']


def test_no_hooks_left_and_copies_are_clean():
    m = full_taps_model('vit_t')
    m(X)
    assert sum(len(mod._forward_hooks) for mod in m.modules()) == 0
    c = copy.deepcopy(m)
    assert torch.equal(c(X).attn['blocks.0'], m(X).attn['blocks.0'])


def test_local_weights_roundtrip_and_adaptation(tmp_path, monkeypatch):
    import timm.models._builder as builder
    def no_net(*a, **k): raise AssertionError('network access attempted')
    for fn in ('load_state_dict_from_url', 'load_state_dict_from_hf', 'download_cached_file'):
        if hasattr(builder, fn): monkeypatch.setattr(builder, fn, no_net)
    seed_everything(2)
    src = create_model('vit_s', 10, 1).eval()
    p = save_weights(src, tmp_path / 'v.safetensors')
    torch.save({'model': src.model.state_dict()}, tmp_path / 'v.pth')
    for f in (p, tmp_path / 'v.pth'):
        back = create_model('vit_s', 10, 1, pretrained_file=f).eval()
        assert weights_hash(back) == weights_hash(src)
        assert torch.equal(back(X).logits, src(X).logits)
    # another head size: trunk kept, classifier new
    seven = create_model('vit_s', 7, 1, pretrained_file=p)
    assert seven.num_classes == 7 and torch.equal(seven.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight)
    # 3-channel model from the 1-channel file: timm adapts the first conv (repeat / 3)
    rgb = create_model('vit_s', 10, 3, pretrained_file=p)
    w1, w3 = src.model.patch_embed.proj.weight, rgb.model.patch_embed.proj.weight
    assert w3.shape[1] == 3
    torch.testing.assert_close(w3.sum(1, keepdim=True), w1)
    # a stock timm name from a file of its own weights
    r = timm.create_model('resnet10t', num_classes=4)
    torch.save(r.state_dict(), tmp_path / 'r.pth')
    r2 = create_model('resnet10t', 4, 3, pretrained_file=tmp_path / 'r.pth')
    assert weights_hash(r2) == weights_hash(r)


def test_hub_weights_refused_with_instructions():
    with pytest.raises(KdnbError) as e: create_model('resnet18', pretrained=True)
    msg = str(e.value)
    assert '`pretrained`' in msg and 'pretrained_file=' in msg and 'never' in msg and 'downloads' in msg


@pytest.mark.parametrize('kw,arg', [
    (dict(arch='resnet_19'), '`arch`'),
    (dict(arch='hf-hub:timm/resnet18.a1_in1k'), '`arch`'),
    (dict(arch=None), '`arch`'),
    (dict(arch='resnet_t', taps=('tokens',)), '`taps`'),
    (dict(arch='convnext_t', taps=('attn',)), '`taps`'),
    (dict(arch='mixer_t', taps=('prefix',)), '`taps`'),
    (dict(arch='vit_t', taps=('logits', 'hidden')), '`taps`'),
    (dict(arch='vit_t', taps=()), '`taps`'),
    (dict(arch='vit_t', feature_names=['blocks.7']), '`feature_names`'),
    (dict(arch='vit_t', feature_names=[9]), '`feature_names`'),
    (dict(arch='vit_t', attn_blocks=[-5]), '`attn_blocks`'),
    (dict(arch='vit_t', attn_blocks=['last']), '`attn_blocks`'),
    (dict(arch='vit_t', num_classes=-1), '`num_classes`'),
    (dict(arch='vit_t', in_chans=0), '`in_chans`'),
    (dict(arch='resnet_t', pretrained_file='/no/such/file.pth'), '`pretrained_file`'),
])
def test_bad_input_names_the_argument(kw, arg):
    kw = dict(kw); arch = kw.pop('arch')
    kw.setdefault('in_chans', 1)
    with pytest.raises(KdnbError) as e: create_model(arch, **kw)
    assert arg in str(e.value)


def test_unknown_arch_suggests_close_names():
    with pytest.raises(KdnbError) as e: create_model('vit_tt', in_chans=1)
    assert 'vit_t' in str(e.value) and 'Close matches' in str(e.value)
