"""The whole VIAR pipeline on a laptop: no GPU, no download.

    python demo.py                      # or: bash scripts/demo.sh (installs requirements.txt first if needed)
    python demo.py --out my_demo --classes 4 --var_ep 40

Steps (each one calls the repository's own script, as a user would, and is skipped when its output exists):

1. data      ``utils/demo_data.py`` draws a few classes of procedural images (shapes, colours, textures) and writes
             them as an ImageFolder ``<out>/data/{train,val}/<class>/*.png``.
2. tokenizer ``train_vae.py`` trains a tiny multi-scale residual VQVAE -> ``<out>/vae/vae_ch{ch}v{V}z{Cvae}.pth``.
3. VIAR      ``train.py --use_implicit`` trains a tiny VIAR on the frozen tokenizer -> ``<out>/viar/ar-ckpt-last.pth``.
4. samples   ``gen_img.py`` draws ``--per_class`` images of every class with two iteration schedules
             (``--iters_a``, ``--iters_b``: ``iter_left-iter_right``) and a grid per schedule (one row per class).
5. score     FID needs the TensorFlow Inception graph, which cannot be downloaded here; instead a small CNN is trained
             on the demo train split and reports how often the samples of each schedule are classified as the class
             they were asked for (chance = 1 / classes), next to its accuracy on the real validation images and on
             their tokenizer reconstructions (the ceiling the generator can reach).  -> ``<out>/report.json``.

Rerunning the same command resumes: finished steps are skipped, an interrupted training resumes from its
checkpoint (the training scripts do that themselves), missing samples are drawn again.
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.abspath(__file__))


class DemoError(RuntimeError):
    """A step failed; the message names it and what to do."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', type=str, default='demo_output', help='everything goes here')
    g = p.add_argument_group('data')
    g.add_argument('--classes', type=int, default=8, help='number of procedural classes (1-8)')
    g.add_argument('--num_train', type=int, default=100, help='training images per class')
    g.add_argument('--num_val', type=int, default=20, help='validation images per class')
    g.add_argument('--pn', type=str, default='1_2_3_4', help='scales; image side = tokenizer downsampling x last')
    g = p.add_argument_group('tokenizer (train_vae.py)')
    g.add_argument('--vocab_size', type=int, default=256)
    g.add_argument('--z_channels', type=int, default=16)
    g.add_argument('--vae_ch', type=int, default=32, help='tokenizer width')
    g.add_argument('--vae_ch_mult', type=str, default='1_2_4', help='tokenizer levels (1_2_4: 4x downsampling, '
                   'so 16 px images for --pn 1_2_3_4; the published tokenizer is 1_1_2_2_4, 16x)')
    g.add_argument('--vae_norm_groups', type=int, default=8, help='GroupNorm groups (32 would be an instance norm '
                   'at width 32: reconstructions lose their colours)')
    g.add_argument('--vae_ep', type=int, default=10)
    g.add_argument('--vae_bs', type=int, default=16)
    g.add_argument('--vae_lr', type=float, default=3e-3)
    g.add_argument('--vae_extra', type=str, default='', help='more train_vae.py flags, e.g. "--l1 1"')
    g = p.add_argument_group('VIAR (train.py)')
    g.add_argument('--depth', type=int, default=2, help='nominal depth (width 64 x depth)')
    g.add_argument('--p_depth', type=int, default=1, help='pre and post blocks around the implicit block')
    g.add_argument('--var_ep', type=int, default=12)
    g.add_argument('--var_bs', type=int, default=32)
    g.add_argument('--tblr', type=float, default=1e-2, help='base lr (lr = tblr x bs / 256)')
    g.add_argument('--var_extra', type=str, default='', help='more train.py flags')
    g = p.add_argument_group('sampling (gen_img.py) and scoring')
    g.add_argument('--per_class', type=int, default=8, help='samples per class and schedule (seeds 0..n-1)')
    g.add_argument('--cfg', type=float, default=2.0)
    g.add_argument('--iters_a', type=str, default='10-10', help='first schedule iter_left-iter_right (the paper)')
    g.add_argument('--iters_b', type=str, default='1-4', help='second schedule (cheaper)')
    g.add_argument('--clf_steps', type=int, default=150, help='training steps of the scoring classifier')
    g.add_argument('--device', type=str, default='cpu', choices=('cpu', 'cuda', 'auto'))
    g.add_argument('--threads', type=int, default=0, help='torch CPU threads in every step (0: torch default)')
    return p


def parse_schedule(s: str, flag: str):
    try:
        a, b = (int(v) for v in s.split('-'))
        if a < 1 or b < 1:
            raise ValueError
        return a, b
    except ValueError:
        raise SystemExit(f'[demo] error: {flag} {s!r} must look like 10-10 (iterations at the first and last scale, >= 1)')


def run_step(name: str, cmd, log_path: str, env: dict):
    """Runs one script as a subprocess, echoing its output and keeping a copy in ``log_path``."""
    print(f'\n[demo] === {name}: {" ".join(shlex.quote(c) for c in cmd)}', flush=True)
    t0 = time.time()
    with open(log_path, 'a', encoding='utf-8') as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f'step "{name}" failed (exit code {rc}; output in {log_path}); fix what it says and rerun the '
                        f'same command: finished steps are skipped and training resumes')
    print(f'[demo] {name} done in {time.time() - t0:.0f} s', flush=True)
    return time.time() - t0


def main(args):
    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    sched = [parse_schedule(args.iters_a, '--iters_a'), parse_schedule(args.iters_b, '--iters_b')]
    sys.path.insert(0, REPO)
    from utils.arg_util import parse_patch_nums
    from utils import demo_data
    try:
        patch_nums = parse_patch_nums(args.pn)
    except argparse.ArgumentTypeError as e:
        raise DemoError(f'--pn: {e}')
    try:
        vae_ch_mult = [int(m) for m in args.vae_ch_mult.split('_')]
    except ValueError:
        raise DemoError(f'--vae_ch_mult must look like 1_2_4, got {args.vae_ch_mult!r}')
    reso = 2 ** (len(vae_ch_mult) - 1) * patch_nums[-1]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    timings = {}
    log_path = os.path.join(out, 'demo_log.txt')

    # 1. data (drawn at twice the model's resolution; the training scripts resize)
    t0 = time.time()
    data = os.path.join(out, 'data')
    names = demo_data.make_demo_dataset(data, num_train=args.num_train, num_val=args.num_val, num_classes=args.classes,
                                        reso=2 * reso)
    timings['data'] = time.time() - t0
    py = sys.executable

    # 2. tokenizer
    vae_dir = os.path.join(out, 'vae')
    vae_ckpt = os.path.join(vae_dir, f'vae_ch{args.vae_ch}v{args.vocab_size}z{args.z_channels}.pth')
    timings['tokenizer'] = run_step('tokenizer', [
        py, 'train_vae.py', '--data_path', data, '--pn', args.pn, '--ch', str(args.vae_ch), '--ch_mult',
        args.vae_ch_mult, '--num_res_blocks', '1', '--attn', 'False', '--norm_groups', str(args.vae_norm_groups),
        '--vocab_size', str(args.vocab_size), '--z_channels', str(args.z_channels), '--bs', str(args.vae_bs),
        '--ep', str(args.vae_ep), '--lr', str(args.vae_lr), '--wp', '0.5', '--code_restart', '50',
        '--device', args.device, '--local_out_dir_path', vae_dir, '--save_freq', str(max(1, args.vae_ep // 2)),
        '--threads', str(args.threads)] + shlex.split(args.vae_extra), log_path, env)

    # 3. VIAR
    var_dir = os.path.join(out, 'viar')
    timings['viar'] = run_step('VIAR', [
        py, 'train.py', '--data_path', data, '--vae_ckpt', vae_ckpt, '--pn', args.pn, '--depth', str(args.depth),
        '--use_implicit', 'True', '--p_depth', str(args.p_depth), '--bs', str(args.var_bs), '--ep', str(args.var_ep),
        '--tblr', str(args.tblr), '--wp', str(max(1, args.var_ep // 10)), '--mid_reso', '1.0', '--seed', '0',
        '--device', args.device, '--local_out_dir_path', var_dir, '--save_freq', str(args.var_ep)]
        + shlex.split(args.var_extra), log_path, env)
    var_ckpt = os.path.join(var_dir, 'ar-ckpt-last.pth')

    # 4. samples: every class, seeds 0..per_class-1, two iteration schedules, one grid each (a row per class)
    grids, sample_dirs = [], []
    for il, ir in sched:
        sdir = os.path.join(out, 'samples', f'iters-{il}-{ir}')
        sub = os.path.join(sdir, 'ar-ckpt-last')
        seeds = list(range(args.per_class))
        done = glob.glob(os.path.join(sub, '*_grid.png'))
        if done:
            print(f'[demo] samples with iterations {il}->{ir} exist: {done[0]}')
        else:
            t = run_step(f'samples {il}-{ir}', [
                py, 'gen_img.py', '--var_ckpt', var_ckpt, '--vae_ckpt', vae_ckpt, '--use_implicit', 'True',
                '--depth', str(args.depth), '--class_label', *map(str, range(len(names))), '--seeds', *map(str, seeds),
                '--cfg', str(args.cfg), '--iter_left', str(il), '--iter_right', str(ir), '--output_dir', sdir,
                '--save_grid', 'True', '--nrow', str(args.per_class), '--device', args.device], log_path, env)
            timings[f'samples_{il}-{ir}'] = t
        grid = glob.glob(os.path.join(sub, '*_grid.png'))[0]
        grids.append(enlarge(grid, max(1, 128 // reso)))
        sample_dirs.append(sub)

    # 5. score with a small classifier trained on the demo data
    t0 = time.time()
    report = score(args, data, names, vae_ckpt, patch_nums, reso, sched, sample_dirs)
    timings['score'] = time.time() - t0
    report.update(grids={f'{il}-{ir}': g for (il, ir), g in zip(sched, grids)}, classes=names,
                  timings_s={k: round(v, 1) for k, v in timings.items()}, total_s=round(time.time() - t_start, 1))
    with open(os.path.join(out, 'report.json'), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)

    print('\n[demo] ===== done in %.0f s =====' % (time.time() - t_start))
    print(f'[demo] classes (grid rows, top to bottom; label = sorted folder order): {", ".join(sorted(names))}')
    for (il, ir), g in zip(sched, grids):
        acc = report['sample_accuracy'][f'{il}-{ir}']
        print(f'[demo] grid, implicit iterations {il}->{ir}: {g}\n'
              f'         samples classified as the requested class: {100 * acc:.0f}% (chance {100 / len(names):.0f}%)')
    print(f'[demo] classifier accuracy on real val images {100 * report["real_val_accuracy"]:.0f}%, on their '
          f'tokenizer reconstructions {100 * report["recon_val_accuracy"]:.0f}%')
    print(f'[demo] tokenizer reconstructions: {os.path.join(vae_dir, "recon")}; TensorBoard: tensorboard --logdir {out}')
    print(f'[demo] report: {os.path.join(out, "report.json")}')


def enlarge(png: str, factor: int) -> str:
    """A copy of ``png`` enlarged ``factor`` times (nearest neighbour: every generated pixel stays visible)."""
    from PIL import Image
    if factor == 1:
        return png
    out = png[:-4] + f'_x{factor}.png'
    with Image.open(png) as im:
        im.resize((im.width * factor, im.height * factor), Image.NEAREST).save(out + '.tmp.png')
    os.replace(out + '.tmp.png', out)
    return out


def score(args, data, names, vae_ckpt, patch_nums, reso, sched, sample_dirs) -> dict:
    """Trains the demo classifier and measures how often samples show the class they were asked for."""
    import torch.nn.functional as F
    from PIL import Image
    import numpy as np
    from models.checkpoint import load_vae
    from utils import demo_data

    def resize(x):
        return x if x.shape[-1] == reso else F.interpolate(x, size=(reso, reso), mode='area')

    x_tr, y_tr, tr_names = demo_data.load_folder(os.path.join(data, 'train'))
    x_va, y_va, _ = demo_data.load_folder(os.path.join(data, 'val'))
    x_tr, x_va = resize(x_tr), resize(x_va)
    print(f'\n[demo] === score: training the classifier on {len(x_tr)} images ({args.clf_steps} steps)', flush=True)
    clf = demo_data.train_classifier(x_tr, y_tr, len(tr_names), steps=args.clf_steps)
    real_acc = (demo_data.classify(clf, x_va) == y_va).float().mean().item()
    vae = load_vae(vae_ckpt, 'cpu', patch_nums=tuple(patch_nums))
    with torch.no_grad():
        rec = torch.cat([vae.img_to_reconstructed_img(x_va[i:i + 64], last_one=True) for i in range(0, len(x_va), 64)])
    rec_acc = (demo_data.classify(clf, rec) == y_va).float().mean().item()
    # gen_img's labels are the class indices of train/ folders in sorted order; the classifier's are the same
    to_clf = {c: tr_names.index(n) for c, n in enumerate(sorted(names))}
    res = {'chance': 1 / len(names), 'real_val_accuracy': real_acc, 'recon_val_accuracy': rec_acc,
           'sample_accuracy': {}, 'sample_accuracy_per_class': {}}
    for (il, ir), sub in zip(sched, sample_dirs):
        imgs, want = [], []
        for c in range(len(names)):
            for s in range(args.per_class):
                with Image.open(os.path.join(sub, f'class{c}_seed{s}.png')) as im:
                    imgs.append(torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
                want.append(to_clf[c])
        pred = demo_data.classify(clf, resize(torch.stack(imgs)))
        hit = (pred == torch.tensor(want)).float()
        res['sample_accuracy'][f'{il}-{ir}'] = hit.mean().item()
        res['sample_accuracy_per_class'][f'{il}-{ir}'] = hit.view(len(names), -1).mean(1).tolist()
    return res


if __name__ == '__main__':
    a = get_parser().parse_args()
    try:
        main(a)
    except DemoError as e:
        print(f'[demo] error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('[demo] interrupted: rerun the same command to continue where it stopped', file=sys.stderr)
        sys.exit(130)
