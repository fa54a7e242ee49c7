"""Regenerates the parity vectors under tests/golden/data from the official code (see docs/parity.md).

    python -m tests.golden.make --official_var DIR --official_viar DIR --official_flexvar DIR [--out DIR]

The three directories are git checkouts of FoundationVision/VAR, mobiushy/VIAR and jiaosiyu1999/FlexVAR.  Their
``models`` / ``utils`` / ``dist`` modules collide with this repository's, so every official repository is imported in
a subprocess of its own (``--worker``) whose ``sys.path`` starts with that checkout; nothing of this repository's
model code is imported there.  The workers run on the CPU, in float32, with one thread; the models are small and
their weights are drawn by ``tests.golden.weights`` (the files store the seed and the hash, not the weights).
Running it twice gives byte-identical files (fixed seeds, one thread, ``torch.save`` / gzip / zip without
timestamps).  The evaluator vectors need TensorFlow and the ADM evaluator's requirements.
"""
import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = HERE / 'data'

FORMAT = 1          # bump when the layout below changes; tests/test_golden_format.py checks files against it

# the small models: VAR's tokenizer layout at a tiny width, 10 scales (VIAR's sampler spreads its iterations over
# 10 scales whatever the schedule), 160 px images
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
VAE_CFG = dict(V=64, Cvae=16, ch=32, share_quant_resi=4, patch_nums=PATCH_NUMS)
VAR_CFG = dict(num_classes=10, depth=2, attn_l2_norm=True, pre_depth=1, post_depth=1)
FLEX_CFG = dict(V=64, Cvae=32, depth=2, num_classes=10, attn_l2_norm=True, vq_ch=32, z_channels=64)
SEEDS = dict(vqvae=2201, var=2202, var_saln=2203, viar=2204, flex_vae=2205, flex_var=2206, data=2207)
LABELS = (3, 7)



def bf16_kernels() -> dict:
    """What decides how bf16 autocast rounds on this CPU: ATen's vectorised kernels (``ATEN_CPU_CAPABILITY``) and
    whether oneDNN has bf16 instructions (avx512_bf16 / AMX) for the matmuls.  Tokens near a tie flip with them."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return {'aten': torch.backends.cpu.get_cpu_capability(), 'native_bf16': native}


# every file with its top-level keys
LAYOUT = {
    'models/vqvae.pt': {'format', 'official', 'config', 'weights', 'inputs', 'outputs'},
    'models/var.pt': {'format', 'official', 'config', 'weights', 'forward', 'sampling'},
    'models/var_saln.pt': {'format', 'official', 'config', 'weights', 'forward', 'sampling'},
    'models/viar.pt': {'format', 'official', 'config', 'weights', 'forward', 'sampling'},
    'bf16/sampling_bf16.pt': {'format', 'official', 'kernels', 'config_var', 'config_viar', 'cases'},
    'edit/edit.pt': {'format', 'official', 'config_var', 'config_viar', 'cases'},
    'flexvar/flexvar.pt': {'format', 'official', 'config', 'weights', 'tokenize', 'forward', 'sampling'},
    'official_keys.json.gz': {'format', 'official', 'models'},
    'flexvar_keys.json.gz': {'format', 'official', 'models'},
    'evaluator/expected.json': {'format', 'official', 'numbers', 'ref_images', 'sample_images', 'files'},
    'evaluator/ref_batch.npz': None,
    'evaluator/sample_batch.npz': None,
    'evaluator/stand_in_inception.pb': None,
}


# ================================ helpers shared by the workers =======================================================
def _commit(checkout: str) -> str:
    try:
        return subprocess.run(['git', '-C', checkout, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (not a git checkout)'


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image_u8(B: int, side: int, seed: int) -> torch.Tensor:
    """Smooth random images (B, 3, side, side) uint8: uniform noise blurred twice."""
    x = torch.rand(B, 3, side // 4, side // 4, generator=_seeded(seed))
    x = torch.nn.functional.interpolate(x, size=(side, side), mode='bilinear', align_corners=False)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _set_params(module: torch.nn.Module, seed: int) -> dict:
    """Draws every parameter of ``module`` (tests.golden.weights) and returns the record the vectors keep."""
    from tests.golden.weights import draw_params, params_sha256
    shapes = {k: list(p.shape) for k, p in module.named_parameters()}
    drawn = draw_params(shapes, seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            p.copy_(drawn[k])
    return {'seed': seed, 'shapes': shapes, 'sha256': params_sha256(drawn)}


class _Recorder:
    """Wraps the official ``sample_with_top_k_top_p_`` of a module and keeps every scale's draw."""

    def __init__(self, module, name='sample_with_top_k_top_p_'):
        self.module, self.name, self.orig, self.tokens = module, name, getattr(module, name), []
        setattr(module, name, self)

    def __call__(self, *a, **kw):
        out = self.orig(*a, **kw)
        self.tokens.append(out[:, :, 0].clone())
        return out

    def take(self):
        t, self.tokens = self.tokens, []
        return t


def _half(img: torch.Tensor) -> torch.Tensor:
    return img.detach().float().to(torch.float16)


def _notebook_ns(notebook: str) -> dict:
    """The helper cell of VAR's demo_zero_shot_edit.ipynb (get_edit_mask, the masked sampler, replace_embedding),
    executed against the official ``models`` package on sys.path."""
    cells = [''.join(c['source']) for c in json.loads(Path(notebook).read_text())['cells'] if c['cell_type'] == 'code']
    cell = next(c for c in cells if 'def replace_embedding' in c)
    ns = {}
    exec(compile(cell, notebook, 'exec'), ns)     # noqa: S102 (the official notebook's own code)
    return ns


def _grads(model, keys):
    params = dict(model.named_parameters())
    return ({k: p.grad.norm().item() for k, p in params.items() if p.requires_grad},
            {k: params[k].grad.detach().clone() for k in keys})


# ================================ worker: VAR and VIAR ================================================================
# (box y0, x0, y1, x1; inpainting; class label, None: the null class (in/out-painting); more_smooth; seed)
EDIT_CASES = [
    ((0.1, 0.1, 0.8, 0.8), True, None, False, 7),
    ((0.25, 0.25, 0.75, 0.75), False, None, False, 8),
    ((0.2, 0.3, 0.7, 0.9), True, 4, False, 9),
    ((0.1, 0.1, 0.8, 0.8), True, None, True, 10),
]


def worker_var_viar(official: str, notebook: str, which: str) -> dict:
    """``which``: 'var' (tokenizer, VAR, shared-AdaLN VAR from the VAR checkout) or 'viar' (VIAR checkout)."""
    import models.var as official_var
    from models import build_vae_var  # the official package (sys.path starts with the checkout)
    rec = _Recorder(official_var)
    origin = {'repo': 'FoundationVision/VAR' if which == 'var' else 'mobiushy/VIAR', 'commit': _commit(official)}
    names = ('var', 'var_saln') if which == 'var' else ('viar',)
    out, built = {}, {}
    side = 16 * PATCH_NUMS[-1]
    img_u8 = _image_u8(2, side, SEEDS['data'])
    img = img_u8.float() / 127.5 - 1
    for name in names:
        cfg = dict(**VAE_CFG, **VAR_CFG, shared_aln=name == 'var_saln', use_implicit=name == 'viar')
        kw = dict(cfg)
        if which == 'var':
            kw.pop('use_implicit'); kw.pop('pre_depth'); kw.pop('post_depth')
        vae, var = build_vae_var(device='cpu', flash_if_available=False, fused_if_available=False, **kw)
        vae_w = _set_params(vae, SEEDS['vqvae'])
        var_w = _set_params(var, SEEDS[name])
        vae.eval(); var.eval()
        var.cond_drop_rate = 0.0
        built[name] = (vae, var, cfg)

        if name in ('var', 'viar') and which == 'var':        # the tokenizer, once
            with torch.no_grad():
                idx_Bl = vae.img_to_idxBl(img)
                f_hat = vae.quantize.f_to_idxBl_or_fhat(vae.quant_conv(vae.encoder(img)), to_fhat=True)
                out['models/vqvae.pt'] = {
                    'format': FORMAT, 'official': origin, 'config': VAE_CFG, 'weights': vae_w,
                    'inputs': {'img_u8': img_u8},
                    'outputs': {'idx_Bl': idx_Bl, 'f_hat': f_hat, 'var_input': vae.quantize.idxBl_to_var_input(idx_Bl),
                                'recon_last': _half(vae.img_to_reconstructed_img(img, last_one=True)),
                                'idxBl_to_img_last': _half(vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True))}}
        with torch.no_grad():
            idx_Bl = vae.img_to_idxBl(img)
            x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
        label_B = torch.tensor(LABELS)
        iters = (3, 2) if name == 'viar' else None
        if iters:       # the official way to fix VIAR's counts: pin the four attributes
            var.implicit_no_grad_min_iters = var.implicit_no_grad_max_iters = iters[0]
            var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = iters[1]
        logits = var(label_B, x_BLCv)
        gt_BL = torch.cat(idx_Bl, dim=1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt_BL.reshape(-1))
        loss.backward()
        keep = ['word_embed.weight', 'head.bias'] + (
            ['pre_blocks.0.attn.mat_qkv.weight', 'implicit_block_projection.2.weight'] if name == 'viar'
            else ['blocks.0.ffn.fc2.weight'])
        norms, grads = _grads(var, keep)
        var.zero_grad(set_to_none=True)

        sampling = []
        base = dict(B=2, label_B=label_B, cfg=1.5, top_k=20, top_p=0.96, g_seed=7)
        if name == 'viar':
            plans = [dict(iter_left=10, iter_right=10), dict(iter_left=6, iter_right=2),
                     dict(iter_left=2, iter_right=5), dict(iter_left=1, iter_right=1), dict(iter_left=0, iter_right=3),
                     dict(iter_left=3, iter_right=3, more_smooth=True)]
        else:
            plans = [dict(), dict(more_smooth=True), dict(cfg=4.0, top_k=0, top_p=0.0, g_seed=3)]
        for i, plan in enumerate(plans):
            kwargs = {**base, 'more_smooth': False, **plan}
            image = var.autoregressive_infer_cfg(**kwargs)
            with_image = i < 2 if name != 'var_saln' else i == 0
            sampling.append({'kwargs': kwargs, 'tokens': rec.take(), 'image': _half(image) if with_image else None})
        out[f'models/{name}.pt'] = {
            'format': FORMAT, 'official': origin, 'config': cfg, 'weights': {'vqvae': vae_w, 'var': var_w},
            'forward': {'inputs': {'label_B': label_B, 'x_BLCv_wo_first_l': x_BLCv, 'gt_BL': gt_BL, 'iters': iters},
                        'outputs': {'logits': logits.detach(), 'loss': loss.item(), 'grad_norms': norms,
                                    'grads': grads}},
            'sampling': sampling}

    # half precision: CPU bf16 autocast, tokens (and one image per model)
    model = 'var' if which == 'var' else 'viar'
    vae, var, cfg = built[model]
    plans = [dict(g_seed=s) for s in (7, 8, 9, 10, 11, 12)]
    if model == 'viar':
        plans += [dict(g_seed=7, iter_left=6, iter_right=2), dict(g_seed=7, iter_left=2, iter_right=5)]
    plans.append(dict(g_seed=7, more_smooth=True, **(dict(iter_left=3, iter_right=3) if model == 'viar' else {})))
    cases = []
    for i, plan in enumerate(plans):
        kwargs = {**dict(B=2, label_B=torch.tensor(LABELS), cfg=1.5, top_k=20, top_p=0.96, more_smooth=False), **plan}
        with torch.autocast('cpu', dtype=torch.bfloat16):
            image = var.autoregressive_infer_cfg(**kwargs)
        cases.append({'model': model, 'kwargs': kwargs, 'tokens': rec.take(),
                      'image': _half(image) if i == 0 else None})
    out['bf16/sampling_bf16.pt'] = {'format': FORMAT, 'official': {model: origin}, 'kernels': bf16_kernels(),
                                    f'config_{model}': cfg, 'cases': cases}

    # zero-shot editing: the notebook's masked sampler (VAR); VIAR's own sampler with the notebook's replacement of
    # the kept codes just before they enter f_hat (the one place the notebook's function differs from the sampler)
    ns = _notebook_ns(notebook)
    ns['sample_with_top_k_top_p_'] = rec
    quant = vae.quantize
    edit_u8 = _image_u8(1, 16 * PATCH_NUMS[-1], SEEDS['data'] + 1)
    with torch.no_grad():
        tokens = vae.img_to_idxBl(edit_u8.float() / 127.5 - 1, var.patch_nums)
    cases = []
    for i, (box, inpainting, label, more_smooth, seed) in enumerate(EDIT_CASES):
        mask = ns['get_edit_mask'](var.patch_nums, *box, device='cpu', inpainting=inpainting)
        kwargs = dict(B=1, label_B=torch.tensor([cfg['num_classes'] if label is None else label]), g_seed=seed,
                      cfg=1.5, top_k=20, top_p=0.96, more_smooth=more_smooth)
        if model == 'var':
            image = ns['autoregressive_infer_cfg_with_mask'](var, **kwargs, input_img_tokens=tokens, edit_mask=mask)
        else:
            orig = quant.get_next_autoregressive_input
            pns = var.patch_nums

            def masked(si, SN, f_hat, h_BChw, orig=orig, mask=mask, pns=pns):
                gt = quant.embedding(tokens[si]).transpose_(1, 2).reshape(1, quant.Cvae, pns[si], pns[si])
                return orig(si, SN, f_hat, ns['replace_embedding'](mask, h_BChw, gt, pns[si], pns[si]))
            quant.get_next_autoregressive_input = masked
            try:
                image = var.autoregressive_infer_cfg(**kwargs)
            finally:
                del quant.get_next_autoregressive_input
        drawn = rec.take()
        kept = []       # the tokens the image is made of: the input's where the notebook keeps them
        for si, pn in enumerate(var.patch_nums):
            m = ns['replace_embedding'](mask, torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn), pn, pn)
            kept.append(torch.where(m.reshape(1, -1) > 0.5, tokens[si], drawn[si]))
        cases.append({'model': model, 'img_u8': edit_u8, 'box': list(box), 'inpainting': inpainting,
                      'edit_mask': mask, 'kwargs': kwargs, 'tokens': kept,
                      'image': _half(image) if i in (0, 3) else None})
    out['edit/edit.pt'] = {'format': FORMAT, 'official': {model: origin}, f'config_{model}': cfg, 'cases': cases}

    out.update(_published_keys(which, origin))
    return out


def _meta_build(fn):
    """Runs ``fn`` under ``torch.device('meta')``: nothing is allocated.  The official constructors read a few
    numbers with ``.item()`` (drop-path rates, the temperature clamp), which a meta tensor cannot give; they get 0,
    which changes no key nor shape."""
    item = torch.Tensor.item
    torch.Tensor.item = lambda self: 0.0 if self.is_meta else item(self)
    try:
        with torch.device('meta'):
            return fn()
    finally:
        torch.Tensor.item = item


def _layout(module) -> dict:
    return {'num_params': sum(p.numel() for p in module.parameters()),
            'keys': {k: list(v.shape) for k, v in module.state_dict().items()}}


def _published_keys(which: str, origin: dict) -> dict:
    """Keys and shapes of the published checkpoints, from the official constructors on the meta device."""
    from models import build_vae_var
    p256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    p512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    models = {}
    if which == 'var':
        for depth in (16, 20, 24, 30, 36):
            pn = p512 if depth == 36 else p256
            vae, var = _meta_build(lambda d=depth, pn=pn: build_vae_var(
                device='meta', patch_nums=pn, depth=d, shared_aln=d == 36, flash_if_available=False,
                fused_if_available=False))
            models['var_d36_512' if depth == 36 else f'var_d{depth}'] = _layout(var)
            if depth == 30:
                models['vae_ch160v4096z32'] = _layout(vae)
    else:
        _, var = _meta_build(lambda: build_vae_var(device='meta', depth=30, use_implicit=True, pre_depth=5,
                                                   post_depth=5, flash_if_available=False, fused_if_available=False))
        models['viar_d30'] = _layout(var)
    return {'official_keys.json.gz': {'format': FORMAT, 'official': {which: origin}, 'models': models}}


# ================================ worker: FlexVAR =====================================================================
def worker_flexvar(official: str) -> dict:
    import torch.nn as nn
    import torch.nn.functional as F

    import models.flexvar as official_flexvar
    from models.flexvar import FlexVAR
    from models.vq_llama import Decoder, Encoder, VQ_models
    rec = _Recorder(official_flexvar)
    origin = {'repo': 'jiaosiyu1999/FlexVAR', 'commit': _commit(official)}
    c = FLEX_CFG

    def make_vae(V, Cvae, ch=None, z=None):
        vae = VQ_models['VQ-16'](codebook_size=V, codebook_embed_dim=Cvae)
        if ch is not None:      # the official VQ-16 at a smaller width: its own Encoder / Decoder classes
            mult = (1, 1, 2, 2, 4)
            vae.encoder = Encoder(ch=ch, ch_mult=mult, z_channels=z)
            vae.decoder = Decoder(ch=ch, ch_mult=mult, z_channels=z)
            vae.quant_conv, vae.post_quant_conv = nn.Conv2d(z, Cvae, 1), nn.Conv2d(Cvae, z, 1)
        return vae

    def make_var(vae, depth, num_classes):      # the arguments of the official build_vae_var
        return FlexVAR(vae_local=vae, num_classes=num_classes, depth=depth, embed_dim=depth * 64, num_heads=depth,
                       drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                       shared_aln=False, cond_drop_rate=0.1, token_dropout_p=0.05, attn_l2_norm=True,
                       flash_if_available=False, fused_if_available=False)

    vae = make_vae(c['V'], c['Cvae'], c['vq_ch'], c['z_channels'])
    var = make_var(vae, c['depth'], c['num_classes'])
    weights = {'vqvae': _set_params(vae, SEEDS['flex_vae']), 'var': _set_params(var, SEEDS['flex_var'])}
    vae.eval(); var.eval()
    var.cond_drop_rate = 0.0

    # tokens and the teacher-forcing input as the official trainer makes them (encode_var_wo_firstL)
    pns = [1, 2, 3, 4, 6, 8]
    img_u8 = _image_u8(2, 16 * pns[-1], SEEDS['data'] + 2)
    with torch.no_grad():
        h = vae.encode_conti(img_u8.float() / 127.5 - 1)
        idx_Bl, quant_z = [], []
        for i, hw in enumerate(pns):
            q, _, log = vae.quantize(F.interpolate(h.clone(), size=(hw, hw), mode='area'))
            idx_Bl.append(log[-1].view(q.shape[0], -1))
            if i + 1 < len(pns):
                quant_z.append(F.interpolate(q, size=(pns[i + 1],) * 2, mode='bicubic').reshape(*q.shape[:2], -1))
        quant_z = torch.cat(quant_z, dim=2).permute(0, 2, 1)
        label_B = torch.tensor(LABELS)
        logits = var(label_B, quant_z, pns)

    sampling = []
    plans = [dict(infer_patch_nums=[1, 2, 3, 4, 5, 6, 8], cfg=1.5, max_pn=16, used_llamagen_cfg=False),
             dict(infer_patch_nums=[1, 2, 4, 8], cfg=2.5, max_pn=16, used_llamagen_cfg=True),
             dict(infer_patch_nums=[1, 2, 3, 4, 5, 6, 7, 9], cfg=2.5, max_pn=5, used_llamagen_cfg=False)]
    for plan in plans:
        kwargs = dict(B=1, label_B=torch.tensor([LABELS[0]]), top_k=20, top_p=0.95, g_seed=7, **plan)
        image = var.autoregressive_infer_cfg(vae, **kwargs)
        sampling.append({'kwargs': kwargs, 'tokens': rec.take(), 'image': _half(image)})
    out = {'flexvar/flexvar.pt': {
        'format': FORMAT, 'official': origin, 'config': c, 'weights': weights,
        'tokenize': {'img_u8': img_u8, 'patch_nums': pns, 'idx_Bl': idx_Bl, 'quant_z': quant_z},
        'forward': {'label_B': label_B, 'patch_nums': pns, 'x_BLCv_wo_first_l': quant_z, 'logits': logits},
        'sampling': sampling}}

    published = {'FlexVAE.pth:model': _meta_build(lambda: make_vae(8912, 32)).state_dict()}
    for depth in (16, 20, 24):
        published[f'FlexVARd{depth}'] = _meta_build(lambda d=depth: make_var(make_vae(8912, 32), d, 1000)).state_dict()
    out['flexvar_keys.json.gz'] = {'format': FORMAT, 'official': {'flexvar': origin},
                                   'models': {k: {n: list(t.shape) for n, t in sd.items()}
                                              for k, sd in published.items()}}
    return out


# ================================ worker: the ADM evaluator ===========================================================
N_REF, N_SAMPLE, SIDE = 160, 120, 16


def stand_in_graph() -> bytes:
    """A tiny TensorFlow graph with the Inception graph's tensor names: ``ExpandDims:0`` (images, NHWC, 0..255),
    ``mixed_6/conv:0`` (N, 12, 12, 8), ``pool_3:0`` (N, 1, 1, 2048) and ``softmax/logits/MatMul`` (2048 -> 16
    classes).  Its weights are stateless Philox draws inside the graph, so the file holds no weights."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        raw = tf1.placeholder(tf.float32, [None, None, 3], name='DecodeJpeg')
        x = tf.expand_dims(raw, 0, name='ExpandDims')
        x = tf1.image.resize_bilinear(x, [12, 12], name='ResizeBilinear') / 255.0 - 0.5

        def normal(shape, seed, scale):
            return tf.random.stateless_normal(shape, seed=[22, seed], alg='philox') * scale
        conv = tf.nn.conv2d(x, normal([3, 3, 3, 8], 1, 0.6), strides=1, padding='SAME', name='mixed_6/conv')
        h = tf.reshape(tf.tanh(conv), [-1, 12 * 12 * 8])
        pool = tf.nn.relu(tf.matmul(h, normal([12 * 12 * 8, 2048], 2, 1.0 / 34)) + 0.1)
        pool = tf.reshape(pool, [-1, 1, 1, 2048], name='pool_3')
        logits = tf.matmul(tf.reshape(pool, [-1, 2048]), normal([2048, 16], 3, 0.2), name='softmax/logits/MatMul')
        tf.nn.softmax(logits, name='softmax')
    return g.as_graph_def().SerializeToString(deterministic=True)


def _batches():
    rng = np.random.default_rng(SEEDS['data'])

    def smooth(n, bright):
        x = rng.random((n, SIDE // 4, SIDE // 4, 3)) * (1 - bright) + bright * rng.random((n, 1, 1, 3))
        return (np.kron(x, np.ones((1, 4, 4, 1))) * 255).round().astype(np.uint8)
    return smooth(N_REF, 0.3), smooth(N_SAMPLE, 0.5)


def worker_evaluator(official: str) -> dict:
    ref, sample = _batches()
    graph = stand_in_graph()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / 'classify_image_graph_def.pb').write_bytes(graph)       # where the ADM evaluator looks for it
        (tmp / 'ref.npz').write_bytes(npz_bytes(ref))
        (tmp / 'sample.npz').write_bytes(npz_bytes(sample))
        # the Inception Score shuffles its rows with numpy's global generator (one split here, so only the
        # summation order moves): seeded, for identical files
        code = ('import sys, runpy, numpy; numpy.random.seed(0); sys.argv = sys.argv[1:]; '
                'runpy.run_path(sys.argv[0], run_name="__main__")')
        proc = subprocess.run([sys.executable, '-c', code, str(Path(official) / 'evaluator.py'), 'ref.npz',
                               'sample.npz'], cwd=tmp, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f'the ADM evaluator failed:\n{proc.stderr[-3000:]}')
    numbers = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(': ')
        if name in ('Inception Score', 'FID', 'sFID', 'Precision', 'Recall'):
            numbers[name] = float(value)
    assert len(numbers) == 5, proc.stdout
    files = {'graph': 'stand_in_inception.pb', 'ref_batch': 'ref_batch.npz', 'sample_batch': 'sample_batch.npz'}
    return {'evaluator/expected.json': {'format': FORMAT, 'official': {'repo': 'mobiushy/VIAR (evaluator.py)',
                                                                       'commit': _commit(official)},
                                        'numbers': numbers, 'ref_images': N_REF, 'sample_images': N_SAMPLE,
                                        'files': files},
            'evaluator/ref_batch.npz': ref, 'evaluator/sample_batch.npz': sample,
            'evaluator/stand_in_inception.pb': graph}


# ================================ writing =============================================================================
def npz_bytes(arr: np.ndarray) -> bytes:
    """``np.savez`` of ``arr_0`` with a fixed timestamp (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as z:
        info = zipfile.ZipInfo('arr_0.npy', date_time=(1980, 1, 1, 0, 0, 0))
        with z.open(info, 'w') as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def file_bytes(rel: str, obj) -> bytes:
    if rel.endswith('.pt'):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    if rel.endswith('.json.gz'):
        text = json.dumps(obj, separators=(',', ':'), sort_keys=False).encode()
        return gzip.compress(text, compresslevel=9, mtime=0)
    if rel.endswith('.json'):
        return (json.dumps(obj, indent=1) + '\n').encode()
    if rel.endswith('.npz'):
        return npz_bytes(obj)
    return obj


def merge(files: dict, part: dict):
    """Adds a worker's files; the cases of bf16 / edit and the models of the key listings are concatenated."""
    for rel, obj in part.items():
        if rel not in files:
            files[rel] = obj
            continue
        cur = files[rel]
        for k, v in obj.items():
            if k == 'cases':
                cur['cases'] = cur['cases'] + v
            elif k in ('official', 'models'):
                cur[k] = {**cur[k], **v}
            else:
                cur[k] = v


def run_worker(args) -> dict:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(args.official).resolve()))
    for mod in ('models', 'utils', 'dist'):
        assert mod not in sys.modules, f'{mod} imported before the official checkout was put on sys.path'
    if args.worker in ('var', 'viar'):
        return worker_var_viar(args.official, args.notebook, args.worker)
    if args.worker == 'flexvar':
        return worker_flexvar(args.official)
    return worker_evaluator(args.official)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m tests.golden.make', description=__doc__.split('\n\n')[0])
    p.add_argument('--official_var', help='checkout of FoundationVision/VAR')
    p.add_argument('--official_viar', help='checkout of mobiushy/VIAR')
    p.add_argument('--official_flexvar', help='checkout of jiaosiyu1999/FlexVAR')
    p.add_argument('--out', default=str(DATA), help='where the vectors go (default: tests/golden/data)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--official', help=argparse.SUPPRESS)
    p.add_argument('--notebook', help=argparse.SUPPRESS)
    p.add_argument('--part', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        torch.save(run_worker(args), args.part)
        return 0
    for flag in ('official_var', 'official_viar', 'official_flexvar'):
        if not getattr(args, flag) or not Path(getattr(args, flag)).is_dir():
            p.error(f'--{flag} must name a checkout of the official repository')
    notebook = str(Path(args.official_var) / 'demo_zero_shot_edit.ipynb')
    jobs = [('var', args.official_var), ('viar', args.official_viar), ('flexvar', args.official_flexvar),
            ('evaluator', args.official_viar)]
    files = {}
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'TF_NUM_INTRAOP_THREADS': '1',
           'TF_NUM_INTEROP_THREADS': '1', 'TF_CPP_MIN_LOG_LEVEL': '3', 'CUDA_VISIBLE_DEVICES': ''}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkout in jobs:
            part = Path(tmp) / f'{name}.pt'
            cmd = [sys.executable, '-m', 'tests.golden.make', '--worker', name, '--official', checkout,
                   '--notebook', notebook, '--part', str(part)]
            print(f'[{name}] {checkout}', flush=True)
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f'worker {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}')
            merge(files, torch.load(part, weights_only=False))
    assert set(files) == set(LAYOUT), sorted(set(files) ^ set(LAYOUT))
    out = Path(args.out)
    for rel in sorted(files):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(files[rel], dict):
            assert set(files[rel]) == LAYOUT[rel], (rel, sorted(files[rel]))
        data = file_bytes(rel, files[rel])
        tmp_path = path.with_suffix(path.suffix + '.tmp')
        tmp_path.write_bytes(data)
        os.replace(tmp_path, path)
        print(f'{len(data):>9} {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
