"""FlexVAR: published layouts, parity with the official code (the parity vectors' ``flexvar`` case, see
docs/parity.md), any schedule with either backbone, checkpoint recognition and the random training schedule."""
import math
import random

import pytest
import torch

import models
from models import FlexVAE, FlexVAR, build_flexvar, build_vae_var, flex_train_schedule
from models.checkpoint import CheckpointError, infer_vae_config, infer_var_config, load_vae_var
from models.flexvar import FLEX_TOPK_SIDES, sincos_grid
from models.var import ImplicitBackbone, block_causal_mask, published_key
from tests.golden import vectors
from utils.model_io import advice
from utils.zoo import FLEX_TOKENIZER


def f32(sd):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def to_01(raw):
    """The official sampler returns the raw decoder output; ours clamps to [-1, 1] and maps to [0, 1]."""
    return (raw.float().clamp(-1, 1) + 1) / 2


# ================================ published layouts ===================================================================
@pytest.fixture(scope='module')
def published(golden_src):
    return vectors.published_keys(golden_src, 'flexvar_keys')


@pytest.mark.parametrize('depth', [16, 20, 24])
def test_published_transformers_match_flexvar_keys_parity(published, depth):
    vae, var = build_flexvar(depth=depth, device='meta')       # nothing allocated
    assert isinstance(var, FlexVAR) and all(t.is_meta for t in var.state_dict().values())
    got = {k: list(v.shape) for k, v in var.state_dict().items()}
    assert list(got) == list(published[f'FlexVARd{depth}'])           # same keys, same order
    assert got == published[f'FlexVARd{depth}']
    buffers = {published_key(k) for k, _ in var.named_buffers()}
    assert buffers == {'attn_bias_for_masking'} | {k for k in got if k.endswith('zero_k_bias')}
    n_params = sum(math.prod(s) for k, s in published[f'FlexVARd{depth}'].items() if k not in buffers)
    assert sum(p.numel() for p in var.parameters()) == n_params
    cfg = infer_var_config(var.state_dict(), f'FlexVARd{depth}')
    assert cfg == dict(flex=True, depth=depth, num_classes=1000, patch_nums=models.PATCH_NUMS_256, shared_aln=False,
                       attn_l2_norm=True, use_implicit=False, pre_depth=0, post_depth=0, V=8912, Cvae=32, pos_grid=32)


def test_published_tokenizer_matches_flexvae_keys_parity(published):
    vae, _ = build_flexvar(device='meta')
    assert isinstance(vae, FlexVAE) and all(t.is_meta for t in vae.state_dict().values())
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert list(got) == list(published[f'{FLEX_TOKENIZER}:model'])
    assert got == published[f'{FLEX_TOKENIZER}:model']
    assert infer_vae_config(vae.state_dict(), FLEX_TOKENIZER) == dict(
        flex=True, V=8912, Cvae=32, ch=128, z_channels=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, norm_groups=32)


# ================================ parity with the official code =======================================================
@pytest.fixture(scope='module')
def golden(golden_src):
    return vectors.load(golden_src, 'flexvar/flexvar.pt')


@pytest.fixture(scope='module')
def golden_models(golden, golden_src):
    c = golden['config']
    vae, var = build_flexvar(V=c['V'], Cvae=c['Cvae'], depth=c['depth'], num_classes=c['num_classes'],
                             attn_l2_norm=c['attn_l2_norm'], ch=c['vq_ch'], z_channels=c['z_channels'])
    vae_sd, var_sd = vectors.flex_states(golden_src)
    vectors.load_into(vae, vae_sd)
    # a stored mask of another schedule (the official model keeps the last one's) loads strictly and is rebuilt
    vectors.load_into(var, var_sd)
    assert torch.equal(var.attn_bias_for_masking, block_causal_mask(var.patch_nums)[1])
    var.eval()
    var.cond_drop_rate = 0.0
    return vae, var


def test_tokenizer_parity(golden, golden_models):
    vae, _ = golden_models
    t = golden['tokenize']
    idx_Bl = vae.img_to_idxBl(vectors.image(t), t['patch_nums'])
    assert len(idx_Bl) == len(t['idx_Bl'])
    for si, (got, exp) in enumerate(zip(idx_Bl, t['idx_Bl'])):
        assert torch.equal(got, exp), f'tokens differ at scale {si}'
    x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl, t['patch_nums'])
    assert x_BLCv.shape == t['quant_z'].shape
    assert (x_BLCv - t['quant_z'].float()).abs().max().item() < 1e-4
    # the scales default to the token maps' sides
    assert torch.equal(vae.quantize.idxBl_to_var_input(idx_Bl), x_BLCv)


def test_teacher_forcing_logits_parity(golden, golden_models):
    _, var = golden_models
    fw = golden['forward']
    with torch.no_grad():
        logits_BLV = var(fw['label_B'], fw['x_BLCv_wo_first_l'].float(), fw['patch_nums'])   # the official call form
    ref = fw['logits'].float()
    assert logits_BLV.shape == ref.shape
    assert ((logits_BLV - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_sampling_parity(golden, golden_models):
    """Every case: VAR's guidance ramp, LlamaGen's guidance, max_pn below the last scale (full cfg and greedy draws
    above it, greedy at sides outside FLEX_TOPK_SIDES).  Case 0 uses the official positional form (leading vqvae)."""
    vae, var = golden_models
    assert len(golden['sampling']) >= 3
    assert {c['kwargs']['used_llamagen_cfg'] for c in golden['sampling']} == {False, True}
    assert any(c['kwargs']['max_pn'] < c['kwargs']['infer_patch_nums'][-1] for c in golden['sampling'])
    for i, case in enumerate(golden['sampling']):
        kw = dict(case['kwargs'])
        if i == 0:
            img, idx = var.autoregressive_infer_cfg(
                vae, kw['B'], kw['label_B'], kw['infer_patch_nums'], kw['g_seed'], kw['cfg'], kw['top_k'], kw['top_p'],
                False, kw['max_pn'], kw['used_llamagen_cfg'], ret_idx_Bl=True)
        elif i == 1:
            img, idx = var.autoregressive_infer_cfg(vqvae=vae, **kw, ret_idx_Bl=True)
        else:
            img, idx = var.autoregressive_infer_cfg(**kw, ret_idx_Bl=True)
        assert len(idx) == len(case['tokens'])
        for si, (got, exp) in enumerate(zip(idx, case['tokens'])):
            assert torch.equal(got, exp), f'case {i} {kw["infer_patch_nums"]}: tokens differ at scale {si}'
        assert img.shape == case['image'].shape and 0 <= img.min() and img.max() <= 1
        assert (img - to_01(case['image'])).abs().max().item() < 2e-3, f'case {i}'


def test_checkpoint_files_are_recognised_golden(golden, golden_models, tmp_path):
    """FlexVAR's tokenizer file is ``{'model': state}``; the transformer a bare state dict or a training checkpoint.
    The kind, the depth and the tokenizer's widths (here ch 32, z_channels 64) are read from the keys."""
    vae_path, var_path, ckpt_path = tmp_path / FLEX_TOKENIZER, tmp_path / 'FlexVARd2.pth', tmp_path / 'ar-ckpt.pth'
    vae_sd, var_sd = golden_models[0].state_dict(), golden_models[1].state_dict()
    torch.save({'model': vae_sd}, vae_path)
    torch.save(var_sd, var_path)
    torch.save({'epoch': 1, 'trainer': {'var_wo_ddp': var_sd}}, ckpt_path)
    fw = golden['forward']
    for path in (var_path, ckpt_path):
        vae, var = load_vae_var(str(vae_path), str(path))
        assert isinstance(vae, FlexVAE) and isinstance(var, FlexVAR) and not var.backbone.is_implicit
        assert (vae.ch, vae.z_channels, vae.vocab_size, vae.Cvae) == (32, 64, golden['config']['V'], 32)
        assert var.depth == golden['config']['depth'] and var.num_classes == golden['config']['num_classes']
        var.cond_drop_rate = 0.0
        logits = var(fw['label_B'], fw['x_BLCv_wo_first_l'].float(), infer_patch_nums=fw['patch_nums'])
        ref = fw['logits'].float()
        assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4

    # mismatches: one sentence each
    torch.manual_seed(0)
    var_vae, var_var = build_vae_var(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=3, depth=1)
    var_vae_path, var_var_path = tmp_path / 'vae.pth', tmp_path / 'var.pth'
    torch.save(var_vae.state_dict(), var_vae_path)
    torch.save(var_var.state_dict(), var_var_path)
    with pytest.raises(CheckpointError, match=r"needs FlexVAR's tokenizer \(a FlexVAE\), but the tokenizer given") as e:
        load_vae_var(str(var_vae_path), str(var_path))
    assert '--' not in str(e.value) and advice(e.value).endswith('as --vae_ckpt')     # the scripts' advice
    with pytest.raises(CheckpointError, match=r"holds a VAR model .*needs VAR's multi-scale VQVAE"):
        load_vae_var(str(vae_path), str(var_var_path))
    with pytest.raises(CheckpointError, match=r'holds a FlexVAR model \(depth 2\), but VAR/VIAR was asked for'):
        load_vae_var(str(vae_path), str(var_path), expect={'flex': False})
    with pytest.raises(CheckpointError, match=r'holds a VAR model \(depth 1\), but FlexVAR was asked for'):
        load_vae_var(str(var_vae_path), str(var_var_path), expect={'flex': True})
    with pytest.raises(CheckpointError, match=r'FlexVAR model \(depth 2\) with depth=2, but depth=16 was asked for'):
        load_vae_var(str(vae_path), str(var_path), expect={'depth': 16, 'flex': True})
    with pytest.raises(CheckpointError, match=r'but an implicit FlexVAR was asked for') as e:
        load_vae_var(str(vae_path), str(var_path), expect={'use_implicit': True})
    assert advice(e.value).startswith('drop --use_implicit')


# ================================ any schedule, either backbone =======================================================
TINY = dict(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, patch_nums=(1, 2, 3, 4))


def tiny(use_implicit: bool, depth: int = 2):
    torch.manual_seed(0)
    vae, var = build_flexvar(depth=depth, use_implicit=use_implicit, pre_depth=1, post_depth=1, **TINY)
    with torch.no_grad():       # a fresh init has tiny AdaLN gammas: make the blocks matter
        for b in var.all_blocks():
            b.ada_lin[-1].weight.normal_(0, 0.05)
        var.head.weight.normal_(0, 0.5)
    var.cond_drop_rate = 0.0
    return vae, var.eval()


def test_fresh_build_initialises_the_paradigm():
    vae, var = tiny(False)
    assert torch.equal(var.pos_1LC, sincos_grid(var.C, 32))
    assert torch.equal(var.attn_bias_for_masking, block_causal_mask(TINY['patch_nums'])[1])
    assert torch.allclose(vae.quantize.embedding.weight.norm(dim=-1), torch.ones(TINY['V']))
    assert not hasattr(var, 'lvl_embed') and 'lvl_1L' not in var.state_dict()


def test_sincos_grid_is_the_official_formula():
    C, side = 6, 5
    w = [math.exp(i * -(math.log(10000.0) / C)) for i in range(0, C, 2)]
    grid = sincos_grid(C, side)
    for y in range(side):
        for x in range(side):
            for i, wi in enumerate(w):
                assert grid[0, 2 * i, y, x].item() == pytest.approx(math.sin(y * wi), abs=1e-6)
                assert grid[0, 2 * i + 1, y, x].item() == pytest.approx(math.cos(x * wi), abs=1e-6)


@pytest.mark.parametrize('use_implicit', [False, True])
def test_any_schedule_teacher_forcing_and_sampling(use_implicit):
    """Two schedules at 64 px and one at 128 px, with either backbone: the KV-cached sampler draws (greedy, cfg 0), at
    every scale, the argmax of the block-causal teacher-forcing logits on the tokens it drew (implicit: n steps at
    every scale = teacher forcing with iters (0, n))."""
    vae, var = tiny(use_implicit)
    assert isinstance(var.backbone, ImplicitBackbone) == use_implicit
    assert var.family == ('FlexVIAR' if use_implicit else 'FlexVAR')
    n = 2
    labels = torch.tensor([0, 2])
    for schedule in ((1, 2, 3, 4), (1, 2, 4), (1, 2, 4, 8)):
        trace = {}
        img, idx = var.autoregressive_infer_cfg(2, labels, infer_patch_nums=schedule, g_seed=0, cfg=0.0, top_k=1,
                                                iter_left=n, iter_right=n, ret_idx_Bl=True, trace=trace)
        assert img.shape == (2, 3, 16 * schedule[-1], 16 * schedule[-1]) and 0 <= img.min() and img.max() <= 1
        assert [t.shape[1] for t in idx] == [pn * pn for pn in schedule]
        assert trace['iters'] == ([n] * len(schedule) if use_implicit else [])     # the knob, per scale
        x_BLCv = vae.quantize.idxBl_to_var_input(idx, schedule)
        with torch.no_grad():
            logits = var(labels, x_BLCv, schedule, iters=(0, n))
        assert torch.equal(logits.argmax(-1), torch.cat(idx, dim=1)), schedule
        # the image is the decoder of the last scale's codes
        assert torch.allclose(img, vae.idxBl_to_img(idx).add(1).mul(0.5), atol=1e-6)


def test_implicit_flexvar_trains_with_iters_and_a_drawn_schedule():
    vae, var = tiny(True)
    var.train()
    schedule = (1, 2, 4)
    imgs = torch.rand(2, 3, 64, 64) * 2 - 1
    idx = vae.img_to_idxBl(imgs, schedule)
    x_BLCv = vae.quantize.idxBl_to_var_input(idx, schedule)
    assert x_BLCv.shape == (2, 4 + 16, TINY['Cvae'])
    logits = var(torch.tensor([0, 1]), x_BLCv, schedule, iters=(2, 1))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat(idx, 1).flatten())
    loss.backward()
    for name in ('pos_1LC', 'pos_start', 'implicit_block_projection.0.weight', 'pre_blocks.0.attn.mat_qkv.weight',
                 'implicit_block.ffn.fc1.weight', 'post_blocks.0.ffn.fc2.weight', 'word_embed.weight'):
        g = {published_key(k): p for k, p in var.named_parameters()}[name].grad
        assert g is not None and g.abs().sum() > 0, name
    # more iterations, different logits (the knob reaches the implicit block)
    var.eval()
    with torch.no_grad():
        a = var(torch.tensor([0, 1]), x_BLCv, schedule, iters=(0, 1))
        b = var(torch.tensor([0, 1]), x_BLCv, schedule, iters=(0, 3))
    assert not torch.allclose(a, b)


def test_implicit_flexvar_checkpoint_round_trip(tmp_path):
    vae, var = tiny(True)
    torch.save({'model': vae.state_dict()}, tmp_path / FLEX_TOKENIZER)
    torch.save(var.state_dict(), tmp_path / 'flex_implicit.pth')
    vae2, var2 = load_vae_var(str(tmp_path / FLEX_TOKENIZER), str(tmp_path / 'flex_implicit.pth'),
                              expect={'flex': True, 'use_implicit': True, 'depth': 2})
    assert isinstance(var2, FlexVAR) and var2.describe() == 'FlexVIAR-d2 (1 pre + 1 implicit + 1 post blocks)'
    assert (vae2.ch, vae2.z_channels) == (TINY['ch'], TINY['z_channels'])
    var2.cond_drop_rate = 0.0
    schedule = (1, 2, 4)
    x_BLCv = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.rand(1, 3, 64, 64) * 2 - 1, schedule))
    with torch.no_grad():
        assert torch.equal(var(torch.tensor([1]), x_BLCv, schedule, iters=(1, 2)),
                           var2(torch.tensor([1]), x_BLCv, schedule, iters=(1, 2)))


def test_editing_keeps_the_input_tokens_where_the_mask_says():
    vae, var = tiny(False)
    schedule = (1, 2, 4)
    tokens = vae.img_to_idxBl(torch.rand(2, 3, 64, 64) * 2 - 1, schedule)
    _, idx = var.autoregressive_infer_cfg(2, 1, infer_patch_nums=schedule, g_seed=3, top_k=10, ret_idx_Bl=True,
                                          input_img_tokens=tokens, edit_mask=torch.ones(4, 4))
    for got, exp in zip(idx, tokens):
        assert torch.equal(got, exp)


def test_schedules_are_checked():
    vae, var = tiny(False)
    for bad in ((2, 4), (1, 3, 2), (1, 2, 2), ()):
        with pytest.raises(ValueError, match='strictly increasing list of token-map sides starting with 1'):
            var.autoregressive_infer_cfg(1, 0, infer_patch_nums=bad)
    with pytest.raises(ValueError, match='has 21 tokens, so the teacher-forcing input needs 20, got 29'):
        var(torch.tensor([0]), torch.zeros(1, 29, TINY['Cvae']), (1, 2, 4))
    # the default schedule is the model's
    img = var.autoregressive_infer_cfg(1, 0, g_seed=0)
    assert img.shape == (1, 3, 64, 64)


def test_plain_var_refuses_another_schedule():
    torch.manual_seed(0)
    _, var = build_vae_var(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=3, depth=1)
    x = torch.zeros(1, 4 + 16, 8)
    with pytest.raises(ValueError, match=r'built for the scales \(1, 2, 3, 4\) and cannot use \(1, 2, 4\) '
                                         r'\(only FlexVAR models take any schedule\)'):
        var.teacher_forcing(torch.tensor([0]), x, (1, 2, 4))
    with pytest.raises(ValueError, match='only FlexVAR models take any schedule'):
        var.positions((1, 2, 4))


def test_flexvar_top_k_and_guidance_rules():
    _, var = tiny(False)
    assert [var.top_k_at(0, pn, 900, max_pn=16) for pn in (1, 7, 13, 16, 20, 24)] == [900, 1, 900, 900, 1, 1]
    assert var.top_k_at(0, 24, 900, max_pn=32) == 900 and 23 in FLEX_TOPK_SIDES
    c, u = torch.full((1, 1, 4), 2.0), torch.full((1, 1, 4), 1.0)
    both = lambda: torch.cat((c, u))
    pns = tuple(range(1, 13))            # K = 12 scales: the ramp saturates at si = 9
    assert var.guidance(3, 4, pns, 1.5, both(), 1)[0, 0, 0].item() == pytest.approx(2 + 1.5 * 3 / 9)
    assert var.guidance(11, 12, pns, 1.5, both(), 1, max_pn=16)[0, 0, 0].item() == pytest.approx(2 + 1.5 * 11 / 9)
    assert var.guidance(5, 6, pns, 1.5, both(), 1, max_pn=4)[0, 0, 0].item() == pytest.approx(2 + 1.5)
    assert var.guidance(0, 1, pns, 4.0, both(), 1, used_llamagen_cfg=True)[0, 0, 0].item() == pytest.approx(1 + 4.0)
    out = var.guidance(0, 1, pns, 0.0, both(), 1, invalid_ids=[1, 3])
    assert out[0, 0].tolist() == [2.0, -100.0, 2.0, -100.0]


# ================================ training schedule ===================================================================
def test_flex_train_schedule_rule():
    state = random.getstate()
    rng = random.Random(0)
    draws = [flex_train_schedule(rng) for _ in range(4000)]
    assert random.getstate() == state                                   # only the given generator is used
    assert draws[:50] == [flex_train_schedule(r) for r in [random.Random(0)] for _ in range(50)]   # reproducible
    default = list(models.PATCH_NUMS_256)
    for pns in draws:
        assert pns[0] == 1 and all(a < b for a, b in zip(pns, pns[1:])) and sum(p * p for p in pns) <= 680
        assert set(pns) <= set(range(1, 17)) and 4 <= len(pns) <= 10
        assert pns == default or set(pns) - {1, 2, 16} <= set(range(3, 16))
    frac = lambda cond: sum(map(cond, draws)) / len(draws)
    assert 0.035 < frac(lambda p: p == default) < 0.055       # 5 %, less the 10 % of draws that then drop a scale
    assert frac(lambda p: p[:2] == [1, 2]) > 0.99            # the budget drops may reach the 2, rarely
    assert 0.6 < frac(lambda p: p[-1] == 16) < 0.75          # ... and the 16 often (the official rule)
    assert frac(lambda p: len(p) == 10) < 0.1 and frac(lambda p: len(p) in (8, 9)) > 0.8
