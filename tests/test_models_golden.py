"""Parity with the official implementation: the tokenizer, VAR, shared-AdaLN VAR and VIAR cases of the parity vectors
(``golden/models``, ``golden/bf16``; random weights, CPU, fp32 unless autocast).  See docs/parity.md."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.var import published_key
from tests.golden import vectors


@pytest.fixture(scope='module')
def vae_case(golden_src):
    d = vectors.load(golden_src, 'models/vqvae.pt')
    c = d['config']
    vae = models.VQVAE(vocab_size=c['V'], z_channels=c['Cvae'], ch=c['ch'], share_quant_resi=c['share_quant_resi'],
                       v_patch_nums=c['patch_nums'])
    vectors.load_into(vae, vectors.vae_state(golden_src))
    return vae.eval(), d


def build(golden_src, vae_case, name):
    g = vectors.load(golden_src, f'models/{name}.pt')
    c = g['config']
    vae, var = models.build_vae_var(
        V=c['V'], Cvae=c['Cvae'], ch=c['ch'], share_quant_resi=c['share_quant_resi'], patch_nums=c['patch_nums'],
        num_classes=c['num_classes'], depth=c['depth'], shared_aln=c['shared_aln'], attn_l2_norm=c['attn_l2_norm'],
        use_implicit=c['use_implicit'], pre_depth=c['pre_depth'], post_depth=c['post_depth'])
    vae.load_state_dict(vae_case[0].state_dict(), strict=True)
    vectors.load_into(var, vectors.var_state(golden_src, name))
    var.eval()
    var.cond_drop_rate = 0.0
    return vae, var, g


def test_tokenizer_parity(vae_case):
    vae, d = vae_case
    img = vectors.image(d['inputs'])
    out = d['outputs']
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(img)
        assert len(idx_Bl) == len(out['idx_Bl'])
        for si, (got, exp) in enumerate(zip(idx_Bl, out['idx_Bl'])):
            assert torch.equal(got, exp), f'tokens differ at scale {si}'
        f_hats = vae.quantize.f_to_idxBl_or_fhat(vae.img_to_f(img), to_fhat=True)
        for got, exp in zip(f_hats, out['f_hat']):
            torch.testing.assert_close(got, exp.float(), rtol=0, atol=1e-4 * exp.float().abs().max().item())
        torch.testing.assert_close(vae.quantize.idxBl_to_var_input(idx_Bl), out['var_input'].float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.img_to_reconstructed_img(img, last_one=True), out['recon_last'].float(),
                                   rtol=0, atol=2e-3)
        torch.testing.assert_close(vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True),
                                   out['idxBl_to_img_last'].float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize('name, pinned', [('var', False), ('var_saln', False), ('viar', False), ('viar', True)])
def test_teacher_forcing_logits_loss_and_grads_parity(golden_src, vae_case, name, pinned):
    """``pinned``: VIAR's iteration counts set the official way, by pinning the four attributes (min = max), in eval
    mode and without ``iters=``."""
    vae, var, g = build(golden_src, vae_case, name)
    inp, out = g['forward']['inputs'], g['forward']['outputs']
    if pinned:
        n0, n1 = inp['iters']
        var.implicit_no_grad_min_iters = var.implicit_no_grad_max_iters = n0
        var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = n1
        logits_BLV = var(inp['label_B'], inp['x_BLCv_wo_first_l'].float())
    else:
        logits_BLV = var(inp['label_B'], inp['x_BLCv_wo_first_l'].float(), iters=inp['iters'])
    ref = out['logits'].float()
    assert logits_BLV.shape == ref.shape
    assert ((logits_BLV - ref).abs().max() / ref.abs().max()).item() < 1e-4
    loss = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), inp['gt_BL'].reshape(-1))
    assert abs(loss.item() - out['loss']) <= 1e-3 * abs(out['loss'])
    loss.backward()
    params = {published_key(k): p for k, p in var.named_parameters()}     # the official names
    assert set(out['grad_norms']) == {k for k, p in params.items() if p.requires_grad}
    for k, ref_norm in out['grad_norms'].items():
        got = params[k].grad.norm().item()
        assert abs(got - ref_norm) <= 1e-3 * ref_norm + 1e-12, (k, got, ref_norm)
    for k, ref_grad in out['grads'].items():
        ref_grad = ref_grad.float()
        err = (params[k].grad - ref_grad).abs().max() / ref_grad.abs().max()
        assert err.item() < 1e-3, k


@pytest.mark.parametrize('name', ['var', 'var_saln', 'viar'])
def test_sampling_tokens_and_images_parity(golden_src, vae_case, name):
    """Every case: every scale's tokens identical; the image within 2e-3 where the case stores one."""
    vae, var, g = build(golden_src, vae_case, name)
    assert len(g['sampling']) >= 2 and g['sampling'][0]['image'] is not None
    if name == 'viar':      # several iteration schedules, and more_smooth
        assert len({(c['kwargs']['iter_left'], c['kwargs']['iter_right']) for c in g['sampling']}) >= 3
    assert any(c['kwargs']['more_smooth'] for c in g['sampling']) or name == 'var_saln'
    for case in g['sampling']:
        img, idx_per_scale = var.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
        assert len(idx_per_scale) == len(case['tokens'])
        for si, (got, exp) in enumerate(zip(idx_per_scale, case['tokens'])):
            assert torch.equal(got, exp), f'{name} {case["kwargs"]}: tokens differ at scale {si}'
        if case['image'] is not None:
            assert (img - case['image'].float()).abs().max().item() < 2e-3, case['kwargs']


def test_bf16_autocast_sampling_gives_the_official_tokens_golden(golden_src, vae_case):
    """Under CPU bf16 autocast the sampler rounds as the official code does: every scale's tokens are the official
    ones (``golden/bf16/sampling_bf16.pt``, made by the official code with the same weights)."""
    d = vectors.load(golden_src, 'bf16/sampling_bf16.pt')
    if vectors.bf16_kernels_differ(d):
        pytest.skip(vectors.bf16_kernels_differ(d))
    models_ = {name: build(golden_src, vae_case, name)[1] for name in ('var', 'viar')}
    assert len(d['cases']) >= 2 and {c['model'] for c in d['cases']} == {'var', 'viar'}
    for case in d['cases']:
        var = models_[case['model']]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            img, idx_per_scale = var.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
        for si, (got, exp) in enumerate(zip(idx_per_scale, case['tokens'])):
            assert torch.equal(got, exp), f'{case["model"]} {case["kwargs"]}: tokens differ at scale {si}'
        if case.get('image') is not None:
            assert (img.float() - case['image'].float()).abs().max().item() < 2e-2, case['kwargs']
