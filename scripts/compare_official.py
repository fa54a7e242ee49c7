"""Images/s of this repository's sampler against the official VIAR code, on the same random weights.

Each side runs in its own Python process (the official ``models`` package has the same name as this one): the
official one imports the code of the checkout given by ``--official`` (github.com/mobiushy/VIAR; nothing of it is
part of this repository), this repository's side imports its own.  Per model and schedule the two sides take turns,
one process each per round, ``--rounds`` rounds, so a change of the machine's load falls on both alike; each
process makes ``--warmup`` untimed calls, then times ``--calls`` calls of ``autoregressive_infer_cfg`` under the
same autocast (``--dtype``) in ``torch.inference_mode``.  The best wall-clock time and the best CPU time of each
side are reported, with the largest difference between the two sides' images (0 means the same pixels).

    python -m scripts.compare_official --official ../official/VIAR --dtype bf16 --threads 1

Models: ``var_d16`` (VAR, 16 blocks) and ``viar_d30`` (VIAR: 5 pre + implicit + 5 post blocks), both at
``--width`` channels (default 1024, the depth-16 width), random weights (``scripts.bench.build``), tokenizer
``--vae_ch`` (32 as the benchmark's default on CPU; 160 is the published one).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 128: (1, 2, 3, 4, 5, 6, 8)}


# ============================================== worker (one side, one process) ========================================
def worker(a) -> None:
    """Builds the side's models, loads the shared state dicts, times the calls; prints one JSON line."""
    import torch
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    sd = torch.load(a.weights, map_location='cpu', weights_only=True)
    cfg = sd['config']
    pns = tuple(cfg['patch_nums'])
    if a.worker == 'official':
        sys.path.insert(0, os.path.abspath(a.official))
        from models import VAR, VQVAE  # the official checkout's package
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=cfg['vae_ch'], test_mode=True, share_quant_resi=4,
                    v_patch_nums=pns)
        var = VAR(vae_local=vae, num_classes=1000, depth=cfg['depth'], embed_dim=cfg['width'],
                  num_heads=cfg['width'] // 64, drop_path_rate=0.1 * cfg['depth'] / 24, attn_l2_norm=True,
                  patch_nums=pns, use_implicit=cfg['use_implicit'], pre_depth=5, post_depth=5)
    else:
        sys.path.insert(0, REPO)
        from scripts.bench import build
        vae, var = build(cfg['name'], cfg['width'], cfg['vae_ch'], 'cpu', pns)
    vae.load_state_dict(sd['vae'], strict=True)
    var.load_state_dict(sd['var'], strict=True)
    vae.eval()
    var.eval()
    dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[a.dtype]
    if a.worker == 'ours' and dtype != torch.float32 and a.cast:
        var.cast_for_inference(dtype)
    labels = torch.arange(a.batch_size) % 1000
    kw = dict(cfg=1.5, top_k=900, top_p=0.96, iter_left=a.iter_left, iter_right=a.iter_right)
    times, img = [], None
    for i in range(a.warmup + a.calls):
        with torch.inference_mode(), torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
            t0, c0 = time.perf_counter(), time.process_time()
            img = var.autoregressive_infer_cfg(a.batch_size, labels, g_seed=i, **kw)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= a.warmup:
            times.append((dt, dc))
    torch.save(img.float(), a.image_out)
    print(json.dumps(dict(side=a.worker, times=times)), flush=True)


# ============================================== driver ================================================================
def make_weights(name: str, width: int, vae_ch: int, reso: int, path: str) -> None:
    """Random weights of ``name`` (this repository's builder, the published key names), saved for both sides."""
    import torch
    sys.path.insert(0, REPO)
    from scripts.bench import MODELS, build
    torch.manual_seed(0)
    vae, var = build(name, width, vae_ch, 'cpu', PATCH_NUMS[reso])
    cfg = dict(name=name, width=width, vae_ch=vae_ch, patch_nums=PATCH_NUMS[reso], depth=MODELS[name]['depth'],
               use_implicit=MODELS[name].get('use_implicit', False))
    torch.save(dict(config=cfg, vae=vae.state_dict(), var=var.state_dict()), path)


def run_side(a, side: str, weights: str, image_out: str, il: int, ir: int) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', side, '--weights', weights, '--image_out', image_out,
           '--official', a.official, '--dtype', a.dtype, '--threads', str(a.threads), '--batch_size',
           str(a.batch_size), '--warmup', str(a.warmup), '--calls', str(a.calls), '--iter_left', str(il),
           '--iter_right', str(ir), '--cast', str(a.cast)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    out = subprocess.run(cmd, cwd=a.official if side == 'official' else REPO, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f'the {side} worker failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])['times']


def compare(a) -> None:
    import torch
    if not os.path.isfile(os.path.join(a.official, 'models', 'var.py')):
        sys.exit(f'--official {a.official!r} is not a checkout of the official VIAR code (no models/var.py)')
    cases = []
    for name in a.models.split(','):
        if name == 'var_d16':
            cases.append((name, 0, 0))
        elif name == 'viar_d30':
            cases += [(name, *map(int, s.split('-'))) for s in a.schedules.split(',')]
        else:
            sys.exit(f'unknown model {name!r} (var_d16 or viar_d30)')
    print(f'# {a.dtype}, width {a.width}, tokenizer ch {a.vae_ch}, {a.reso} px, B = {a.batch_size}, '
          f'{a.threads} thread(s), {a.rounds} rounds alternating, {a.warmup} warm-up + {a.calls} timed call(s) per '
          f'process; ours: weights {"cast once" if a.cast and a.dtype != "fp32" else "as loaded"}; '
          f'load average {os.getloadavg()[0]:.2f} at start', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, il, ir in cases:
            weights = os.path.join(tmp, f'{name}.pt')
            if not os.path.exists(weights):
                make_weights(name, a.width, a.vae_ch, a.reso, weights)
            wall = {'ours': [], 'official': []}
            cpu = {'ours': [], 'official': []}
            for r in range(a.rounds):
                for side in (('ours', 'official') if r % 2 == 0 else ('official', 'ours')):
                    for dt, dc in run_side(a, side, weights, os.path.join(tmp, f'{side}.pt'), il, ir):
                        wall[side].append(dt)
                        cpu[side].append(dc)
            diff = (torch.load(os.path.join(tmp, 'ours.pt')) - torch.load(os.path.join(tmp, 'official.pt')))
            row = dict(model=name, iters=f'{il}->{ir}' if name.startswith('viar') else '-',
                       ours=a.batch_size / min(wall['ours']), official=a.batch_size / min(wall['official']),
                       cpu_ours=min(cpu['ours']), cpu_official=min(cpu['official']),
                       max_diff=diff.abs().max().item())
            row['speedup'] = row['ours'] / row['official']
            row['cpu_speedup'] = row['cpu_official'] / row['cpu_ours']
            rows.append(row)
            print(format_row(row), flush=True)
    print(f'# load average {os.getloadavg()[0]:.2f} at the end')
    print('\n| model | iters | ours img/s | official img/s | ours / official | CPU s ours | CPU s official | '
          'ratio of CPU s | max image difference |')
    print('|---|--:|--:|--:|--:|--:|--:|--:|--:|')
    print('\n'.join(format_row(row) for row in rows))


def format_row(row: dict) -> str:
    """A table row: best wall-clock images/s of each side and their ratio, best CPU seconds per call and their
    ratio (on a busy machine the CPU time of a one-thread process is the steadier measure), image difference."""
    return (f'| {row["model"]} | {row["iters"]} | {row["ours"]:.4f} | {row["official"]:.4f} | {row["speedup"]:.2f}x | '
            f'{row["cpu_ours"]:.2f} | {row["cpu_official"]:.2f} | {row["cpu_speedup"]:.2f}x | {row["max_diff"]:.2g} |')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
    p.add_argument('--official', required=True, help='path of a checkout of github.com/mobiushy/VIAR')
    p.add_argument('--models', default='var_d16,viar_d30', help='var_d16, viar_d30 (comma-separated)')
    p.add_argument('--schedules', default='10-10,10-5', help='VIAR iter_left-iter_right (comma-separated)')
    p.add_argument('--width', type=int, default=1024)
    p.add_argument('--vae_ch', type=int, default=32)
    p.add_argument('--reso', type=int, default=256, choices=(128, 256),
                   help='128: the first 7 scales (quick; the official code spreads a VIAR schedule over 10 scales '
                        'whatever their number, so a non-constant one such as 10-5 differs there)')
    p.add_argument('--batch_size', type=int, default=2)
    p.add_argument('--dtype', default='bf16', choices=('bf16', 'fp32'))
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds (one process per side each)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--calls', type=int, default=1, help='timed calls per process')
    p.add_argument('--cast', type=int, default=1, choices=(0, 1),
                   help='ours: cast the weights once (VAR.cast_for_inference) in half precision')
    p.add_argument('--worker', choices=('ours', 'official'), help=argparse.SUPPRESS)
    p.add_argument('--weights', help=argparse.SUPPRESS)
    p.add_argument('--image_out', help=argparse.SUPPRESS)
    p.add_argument('--iter_left', type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument('--iter_right', type=int, default=10, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """``python scripts/compare_official.py ARGV`` (or one worker process); a problem ends the process with its
    message (``sys.exit``: this tool imports nothing of ours at the top, so that a worker can run in the official
    checkout)."""
    args = get_parser().parse_args(argv)
    worker(args) if args.worker else compare(args)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
