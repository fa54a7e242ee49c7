"""Half-precision inference with the weights cast once (``VAR.cast_for_inference``): the same tokens and images,
bit for bit, as plain autocast (which casts the same weights at every call), on the official bf16 vectors and on tiny
VAR, VIAR and FlexVAR models."""
import argparse
import copy

import pytest
import torch
from script_main import run_main

import models
from models import build_vae_var
from tests.golden import vectors
from utils.zoo import VIAR_MODEL

TINY = dict(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=5)


def golden_model(src, name):
    """The parity vectors' model ``name`` (var or viar) on their tokenizer, in eval mode."""
    return vectors.build_models(src, name)[1]


def tiny(kind, **kw):
    torch.manual_seed(0)
    if kind == 'flexvar':
        vae, var = models.build_flexvar(V=64, Cvae=8, ch=32, z_channels=32,
                                        num_classes=5, depth=2, patch_nums=(1, 2, 3, 4), **kw)
    else:
        vae, var = build_vae_var(depth=3, use_implicit=kind == 'viar', pre_depth=1, post_depth=1, **TINY, **kw)
    with torch.no_grad():       # a fresh init has tiny AdaLN gammas: make the blocks matter
        for b in var.all_blocks():
            (b.ada_lin[-1].weight if hasattr(b, 'ada_lin') else b.ada_gss).normal_(0, 0.05)
        var.head.weight.normal_(0, 0.5)
        for b in var.all_blocks():
            b.attn.q_bias.normal_(0, 0.1)
            b.attn.v_bias.normal_(0, 0.1)
    return var.eval()


def sample(var, autocast=True, **kw):
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        return var.autoregressive_infer_cfg(ret_idx_Bl=True, **kw)


def assert_same(a, b):
    (img_a, idx_a), (img_b, idx_b) = a, b
    assert img_a.dtype == img_b.dtype and torch.equal(img_a, img_b)
    assert all(torch.equal(x, y) for x, y in zip(idx_a, idx_b))


def test_cast_weights_give_the_official_bf16_tokens_and_the_autocast_images(golden_src):
    d = vectors.load(golden_src, 'bf16/sampling_bf16.pt')
    assert {c['model'] for c in d['cases']} == {'var', 'viar'}
    plain = {name: golden_model(golden_src, name) for name in ('var', 'viar')}
    cast = {name: copy.deepcopy(m).cast_for_inference(torch.bfloat16) for name, m in plain.items()}
    official = vectors.bf16_kernels_differ(d) is None      # bf16 tokens are compared on the kernels that made them
    for case in d['cases']:
        got = sample(cast[case['model']], **case['kwargs'])
        for si, (t, exp) in enumerate(zip(got[1], case['tokens'])):
            assert not official or torch.equal(t, exp), f'{case["model"]} {case["kwargs"]}: tokens differ at scale {si}'
        if case.get('image') is not None or not official:     # bit-identical to plain autocast on any CPU
            assert_same(got, sample(plain[case['model']], **case['kwargs']))


@pytest.mark.parametrize('kind, kw', [('var', {}), ('var', dict(shared_aln=True, attn_l2_norm=True)),
                                      ('viar', {}), ('viar', dict(attn_l2_norm=True)), ('flexvar', {})])
def test_cast_is_bit_identical_to_plain_autocast(kind, kw):
    var = tiny(kind, **kw)
    cast = copy.deepcopy(var).cast_for_inference(torch.bfloat16)
    assert cast.head.weight.dtype == torch.bfloat16 and cast.class_emb.weight.dtype == torch.float32
    assert all(b.attn.q_bias.dtype == torch.bfloat16 for b in cast.all_blocks())
    args = dict(B=3, label_B=torch.tensor([0, 4, 2]), g_seed=3, cfg=2.0, top_k=20, top_p=0.9)
    if kind == 'viar':
        args.update(iter_left=4, iter_right=2)
    for more_smooth in (False, True):
        ref = sample(var, more_smooth=more_smooth, **args)
        assert_same(sample(cast, more_smooth=more_smooth, **args), ref)
        # a cast model samples under its autocast by itself
        assert_same(sample(cast, autocast=False, more_smooth=more_smooth, **args), ref)


def test_cast_model_refuses_what_it_cannot_do():
    var = tiny('var').cast_for_inference(torch.bfloat16)
    with pytest.raises(RuntimeError, match='teacher forcing and training need the fp32 weights'):
        var(torch.tensor([0]), torch.zeros(1, var.L - 1, var.Cvae))
    with pytest.raises(ValueError, match='already cast to torch.bfloat16'):
        var.cast_for_inference(torch.float16)
    with pytest.raises(ValueError, match='takes torch.bfloat16 or torch.float16'):
        tiny('var').cast_for_inference(torch.float32)


def test_sampling_scripts_cast_by_default_and_give_the_same_pngs(tmp_path, monkeypatch):
    """``--dtype bf16`` casts the weights once (``--cast_weights``, default on); ``--cast_weights 0`` leaves them in
    fp32: the PNGs are byte-identical."""
    import gen_img
    from utils import sampling_utils
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, num_classes=3, depth=2,
                             use_implicit=True, pre_depth=1, post_depth=1)
    with torch.no_grad():
        var.head.weight.mul_(50)
    torch.save(var.state_dict(), tmp_path / VIAR_MODEL)
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    loaded = []
    load_models = sampling_utils.load_models

    def recording(*a):
        vae_var = load_models(*a)
        loaded.append(vae_var[1])
        return vae_var

    monkeypatch.setattr(sampling_utils, 'load_models', recording)     # what gen_img's load_chosen calls
    for cast in ('1', '0'):
        run_main(gen_img.main, ['--use_implicit', '--depth', '2', '--var_ckpt', str(tmp_path / VIAR_MODEL),
                                         '--vae_ckpt', str(tmp_path / 'vae.pth'), '--class_label', '0', '2',
                                         '--seeds', '3', '--dtype', 'bf16', '--cast_weights', cast,
                                         '--output_dir', str(tmp_path / f'cast{cast}')])
    assert [m.inference_dtype for m in loaded] == [torch.bfloat16, None]
    assert [m.head.weight.dtype for m in loaded] == [torch.bfloat16, torch.float32]
    pngs = [sorted((tmp_path / f'cast{c}').rglob('*.png')) for c in '10']
    assert len(pngs[0]) == 2 and [p.name for p in pngs[0]] == [p.name for p in pngs[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*pngs))


@pytest.mark.parametrize('native, dtype, noted', [(False, 'bf16', True), (True, 'bf16', False), (False, 'fp32', False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_said_once(monkeypatch, capsys, native, dtype, noted):
    from utils import dist, sampling_utils
    monkeypatch.setattr(sampling_utils, 'cpu_has_native_bf16', lambda: native)
    args = argparse.Namespace(device='cpu', dtype=dtype, tf32=False)     # tf32 off: the default precision
    try:
        assert sampling_utils.setup_device(args)[1] == sampling_utils.resolve_dtype(dtype, torch.device('cpu'))
    finally:
        dist.destroy()
    assert capsys.readouterr().out.count('no native bf16 matmul') == int(noted)
