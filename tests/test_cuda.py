"""The CUDA paths, skipped where no GPU is visible: fp32 parity of CUDA with the parity vectors and with the CPU,
fp16 / bf16 autocast sampling, a GradScaler training step (in-process and through train.py), JFB memory flat in
the no-grad steps, autocast's weight cache across no-grad and grad steps, two-process DDP (two GPUs).
``bash scripts/cuda_check.sh`` runs this module and the GPU benchmarks; results in docs/performance.md.
``VIAR_CUDA_TEST_DEVICE=cpu`` runs the device-agnostic tests on the CPU (a dry run of this module)."""
import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.var import published_key
from tests.golden import vectors

REPO = Path(__file__).resolve().parents[1]
DEV = os.environ.get('VIAR_CUDA_TEST_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEV == 'cuda' and not torch.cuda.is_available(), reason='needs a CUDA GPU')
cuda_only = pytest.mark.skipif(DEV != 'cuda', reason='measures CUDA memory')
HALF = {'fp16': torch.float16, 'bf16': torch.bfloat16}


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 means fp32: no TF32 in matmuls or convolutions (the parity tolerances assume it)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def golden(src, name, device=DEV):
    """The parity vectors' tokenizer and model ``name`` (var, var_saln, viar) on ``device``, eval mode, and the
    vector file's contents."""
    vae, var, g = vectors.build_models(src, name)
    return vae.to(device), var.to(device), g


def greedy(kwargs):
    """A parity case's sampler arguments with top-k 1: the draw no longer depends on the generator (CUDA's and the
    CPU's differ), so CUDA and CPU must pick the same tokens."""
    return {**kwargs, 'top_k': 1, 'top_p': 0.0, 'more_smooth': False}


@pytest.mark.parametrize('name', ['var', 'var_saln', 'viar'])
def test_teacher_forcing_on_cuda_matches_the_official_cpu_vectors(golden_src, name):
    _, var, g = golden(golden_src, name)
    inp, out = g['forward']['inputs'], g['forward']['outputs']
    logits_BLV = var(inp['label_B'].to(DEV), inp['x_BLCv_wo_first_l'].float().to(DEV), iters=inp['iters'])
    ref = out['logits'].float()
    assert ((logits_BLV.cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-4
    loss = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), inp['gt_BL'].to(DEV).reshape(-1))
    assert abs(loss.item() - out['loss']) <= 1e-3 * abs(out['loss'])
    loss.backward()
    params = {published_key(k): p for k, p in var.named_parameters()}     # the official names
    for k, ref_norm in out['grad_norms'].items():
        assert abs(params[k].grad.norm().item() - ref_norm) <= 1e-3 * ref_norm + 1e-12, k


@pytest.mark.parametrize('name', ['var', 'viar'])
def test_greedy_sampling_on_cuda_gives_the_cpu_tokens(golden_src, name):
    """Every parity case of the model (VIAR: every iteration schedule) with top-k 1: the tokens of every scale are
    the CPU's, the images within 1e-3."""
    _, cpu, g = golden(golden_src, name, 'cpu')
    _, gpu, _ = golden(golden_src, name)
    for case in g['sampling']:
        kw = greedy(case['kwargs'])
        with torch.inference_mode():
            img_c, idx_c = cpu.autoregressive_infer_cfg(**kw, ret_idx_Bl=True)
            img_g, idx_g = gpu.autoregressive_infer_cfg(**kw, ret_idx_Bl=True)
        for si, (a, b) in enumerate(zip(idx_c, idx_g)):
            assert torch.equal(a, b.cpu()), f'{name} {kw}: tokens differ at scale {si}'
        assert (img_c - img_g.cpu()).abs().max().item() < 1e-3, kw


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
@pytest.mark.parametrize('name', ['var', 'viar'])
def test_half_precision_sampling_is_finite_and_cast_weights_follow_plain_autocast(golden_src, name, dtype):
    """Under fp16 / bf16 autocast the images are finite and in [0, 1]; weights cast once (``cast_for_inference``)
    draw the same first-scale tokens as plain autocast and at least 95 % of all (a GEMM may round its output one
    ulp differently when the weight is a persistent tensor rather than autocast's fresh copy: CPU fp16 does; the
    share of identical tokens and images is printed)."""
    _, var, g = golden(golden_src, name)
    cast = copy.deepcopy(var).cast_for_inference(HALF[dtype])
    for case in g['sampling'][:3]:
        with torch.inference_mode(), torch.autocast(torch.device(DEV).type, dtype=HALF[dtype]):
            img_p, idx_p = var.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
            img_c, idx_c = cast.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
        for img in (img_p, img_c):
            assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
        same = torch.cat([(a == b).flatten() for a, b in zip(idx_p, idx_c)]).float().mean().item()
        print(f'{name} {dtype} {DEV} {case["kwargs"]}: cast vs plain autocast: {100 * same:.1f} % tokens equal, '
              f'images {"identical" if torch.equal(img_p, img_c) else "differ"} '
              f'(max {(img_p.float() - img_c.float()).abs().max().item():.2e})')
        assert torch.equal(idx_p[0], idx_c[0]) and same >= 0.95


def tiny(implicit, **kw):
    torch.manual_seed(0)
    vae, var = models.build_vae_var(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=5, depth=3,
                                    use_implicit=implicit, pre_depth=1, post_depth=1, **kw)
    return vae.to(DEV), var.to(DEV)


def batch(vae, var, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_BLCv = torch.randn(B, var.L - var.first_l, vae.Cvae, generator=g).to(DEV)
    return (torch.randint(0, var.num_classes, (B,), generator=g).to(DEV), x_BLCv,
            torch.randint(0, vae.vocab_size, (B, var.L), generator=g).to(DEV))


@pytest.mark.parametrize('implicit', [False, True])
def test_fp16_training_steps_with_grad_scaler_lower_the_loss(implicit):
    """fp16 autocast + GradScaler (the training harness's ``optimizer_step``) on one fixed batch: every step's
    loss is finite, no step is skipped at a sane scale, the implicit block receives gradients, and the loss falls."""
    from utils.training import optimizer_step
    vae, var = tiny(implicit)
    var.train()
    label_B, x_BLCv, gt_BL = batch(vae, var)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(torch.device(DEV).type, init_scale=2. ** 10)
    losses = []
    for _ in range(12):
        with torch.autocast(torch.device(DEV).type, dtype=torch.float16):
            logits_BLV = var(label_B, x_BLCv, iters=(3, 2) if implicit else None)
            loss = F.cross_entropy(logits_BLV.float().view(-1, vae.vocab_size), gt_BL.view(-1))
        scaler.scale(loss).backward()
        if implicit and not losses:
            grads = [p.grad for n, p in var.named_parameters() if 'implicit_block.' in n and p.grad is not None]
            assert grads and any(gr.abs().sum() > 0 for gr in grads)
        optimizer_step(opt, scaler, list(var.parameters()), clip=2.0)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() >= 2. ** 8
    assert min(losses[-3:]) < losses[0]


def test_autocast_weight_cache_keeps_grad_fn_after_a_no_grad_call():
    """JFB runs no-grad iterations, then iterations with gradient, of the same layer inside one autocast region:
    the half-precision weight copy autocast caches must not be the no-grad one."""
    lin = nn.Linear(16, 16).to(DEV)
    x = torch.randn(4, 16, device=DEV)
    with torch.autocast(torch.device(DEV).type, dtype=torch.float16):
        with torch.no_grad():
            lin(x)
        y = lin(x)
    assert y.grad_fn is not None
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_jfb_no_grad_steps_reach_the_implicit_weights_under_autocast():
    """The same at the model: n0 no-grad steps then n1 steps with gradient in one fp16 autocast region give the
    implicit block the gradient of the n1 steps alone, the same whatever n0 (from the same fixed point start)."""
    vae, var = tiny(True)
    var.train()
    label_B, x_BLCv, gt_BL = batch(vae, var)
    norms = []
    for n0 in (0, 4):
        var.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(DEV).type, dtype=torch.float16):
            logits_BLV = var(label_B, x_BLCv, iters=(n0, 1))
        F.cross_entropy(logits_BLV.float().view(-1, vae.vocab_size), gt_BL.view(-1)).backward()
        g = [p.grad for n, p in var.named_parameters() if 'implicit_block.' in n]
        assert g and all(t is not None for t in g)
        norms.append(sum(t.float().norm() ** 2 for t in g).sqrt().item())
    assert all(v > 0 and math.isfinite(v) for v in norms)


@cuda_only
def test_jfb_training_memory_is_flat_in_the_no_grad_steps():
    """``torch.cuda.max_memory_allocated`` of a forward + backward: the same for n0 = 0, 4, 16 no-grad steps
    (within 2 %), growing with the n1 steps that keep their graph."""
    torch.manual_seed(0)
    vae, var = models.build_vae_var(V=512, Cvae=16, ch=32, patch_nums=(1, 2, 3, 4, 6, 8), num_classes=10, depth=6,
                                    use_implicit=True, pre_depth=1, post_depth=1)
    vae, var = vae.to(DEV), var.to(DEV).train()
    label_B, x_BLCv, gt_BL = batch(vae, var, B=16)

    def peak(n0, n1):
        var.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logits_BLV = var(label_B, x_BLCv, iters=(n0, n1))
        F.cross_entropy(logits_BLV.view(-1, vae.vocab_size), gt_BL.view(-1)).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(0, 1)      # warm-up: gradients, workspace
    flat = [peak(n0, 1) for n0 in (0, 4, 16)]
    assert max(flat) <= 1.02 * min(flat), flat
    grows = [peak(2, n1) for n1 in (1, 3, 6)]
    assert grows[0] < grows[1] < grows[2], grows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    """A tiny tokenizer checkpoint and 3 classes of 64 px images (8 train / 2 val each)."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('cuda_toy')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 2)):
        for c in range(3):
            d = root / 'data' / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) // (c + 1)).save(d / f'{i}.png')
    torch.manual_seed(0)
    vae = models.VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4))
    vae.init_weights()
    torch.save(vae.state_dict(), root / 'vae.pth')
    return root


def train_cmd(root, out, nproc=1):
    args = ['train.py', '--data_path', str(root / 'data'), '--vae_ckpt', str(root / 'vae.pth'), '--pn', '1_2_3_4',
            '--depth', '3', '--use_implicit', 'True', '--p_depth', '1', '--bs', '4', '--ep', '2', '--fp16', '1',
            '--seed', '0', '--log_freq', '1', '--save_freq', '1', '--local_out_dir_path', str(out),
            '--device', DEV if DEV == 'cuda' else 'cpu']
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}',
            *args]


def check_run(r, out):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    losses = [v for line in lines if line['kind'] == 'epoch' for k, v in line.items()
              if k.startswith('L') and isinstance(v, float)]      # L_mean, ...: the epoch's losses
    assert losses and all(math.isfinite(v) for v in losses)
    assert (out / 'ar-ckpt-last.pth').is_file()


def test_train_py_fp16_with_grad_scaler_on_cuda(toy_run, tmp_path):
    """train.py --fp16 1 (float16 + GradScaler on CUDA) runs two epochs of a tiny VIAR and saves its checkpoint."""
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    r = subprocess.run(train_cmd(toy_run, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    check_run(r, out)
    if DEV == 'cuda':       # the checkpoint carries the GradScaler's state (resumable)
        ckpt = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
        assert any(scale > 0 for scale in find(ckpt, 'scale')), 'no GradScaler state in the checkpoint'


def find(obj, key):
    """Every value stored under ``key`` anywhere in nested dicts / lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, (int, float)):
                yield v
            yield from find(v, key)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from find(v, key)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='two-process DDP with NCCL needs two GPUs')
def test_train_py_two_processes_ddp_nccl(toy_run, tmp_path):
    out = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    r = subprocess.run(train_cmd(toy_run, out, nproc=2), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    check_run(r, out)
