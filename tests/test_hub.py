"""Hub folders (models.hub), hubconf.py, scripts/convert.py, --pretrained in the sampling scripts, the sampler-settings
dataclass and the library functions sample_folder / evaluate, on tiny random models and on the parity vectors
(tests/golden)."""
import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from script_main import run_main

import models
from models import build_flexvar, build_vae_var, from_pretrained, push_to_hub, save_pretrained
from models.checkpoint import load_vae_var
from models.hub import HUB_FILES, HubError, read_hub_config, sampler_defaults
from tests.golden import vectors
from utils.errors import UserError
from utils.model_io import hub_sampler_settings
from utils.sampler_settings import SamplerSettings, SettingsError
from utils.zoo import VAR_TOKENIZER, VIAR_MODEL, var_file

REPO = Path(__file__).resolve().parents[1]
PNS = (1, 2, 3, 4)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharpen(var):
    """A fresh init barely depends on the class or the blocks: make both matter, so that equal images mean
    something."""
    with torch.no_grad():
        for b in var.all_blocks():
            if hasattr(b, 'ada_lin'):       # shared AdaLN: one for all blocks (var.shared_ada_lin)
                b.ada_lin[-1].weight.normal_(0, 0.05)
        if var.shared_ada_lin is not None and hasattr(var.shared_ada_lin, '__getitem__'):
            var.shared_ada_lin[-1].weight.normal_(0, 0.05)
        var.class_emb.weight.mul_(20)
        var.head.weight.normal_(0, 0.3)
    return var.eval()


FAMILIES = {
    'VAR': lambda: build_vae_var(patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=3, depth=2),
    'VAR shared AdaLN': lambda: build_vae_var(patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=3, depth=2,
                                              shared_aln=True),
    'VIAR': lambda: build_vae_var(patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=3, depth=2, use_implicit=True,
                                  pre_depth=1, post_depth=1),
    'FlexVAR': lambda: build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=1, patch_nums=PNS),
    'implicit FlexVAR': lambda: build_flexvar(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=1,
                                              patch_nums=(1, 2, 4), use_implicit=True, pre_depth=1, post_depth=1),
}


def tiny(family):
    torch.manual_seed(0)
    vae, var = FAMILIES[family]()
    return vae.eval(), sharpen(var)


def images(var, seed=3, **kw):
    with torch.inference_mode():
        return var.autoregressive_infer_cfg(B=3, label_B=torch.tensor([0, 1, 2]), g_seed=seed, cfg=1.5, top_k=20,
                                            top_p=0.9, **kw)


# ================================ round trip ==========================================================================
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_round_trip_gives_the_same_images(family, tmp_path):
    vae, var = tiny(family)
    before = images(var)
    out = save_pretrained(vae, var, tmp_path / 'hub', training_data='random weights')
    assert sorted(os.listdir(out)) == sorted(HUB_FILES)
    flat = load_file(str(tmp_path / 'hub' / 'model.safetensors'))      # plain safetensors, no pickle
    assert {k.split('.', 1)[0] for k in flat} == {'vae', 'var'}
    assert len(flat) == len(vae.state_dict()) + len(var.state_dict())
    cfg = json.loads((tmp_path / 'hub' / 'config.json').read_text())
    assert cfg['family'] == family.replace('VAR shared AdaLN', 'VAR')
    assert cfg['transformer']['shared_aln'] == (family == 'VAR shared AdaLN')
    assert 'random weights' in (tmp_path / 'hub' / 'README.md').read_text()

    vae2, var2 = from_pretrained(str(tmp_path / 'hub'))
    assert type(vae2) is type(vae) and type(var2) is type(var) and var2.describe() == var.describe()
    assert tuple(var2.patch_nums) == tuple(var.patch_nums)
    for a, b in ((vae, vae2), (var, var2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for p in var2.parameters()) and not var2.training
    assert torch.equal(images(var2), before)


def test_flexvar_keeps_its_default_schedule(tmp_path):
    vae, var = tiny('implicit FlexVAR')
    save_pretrained(vae, var, tmp_path / 'hub')
    _, var2 = from_pretrained(str(tmp_path / 'hub'))
    assert tuple(var2.patch_nums) == (1, 2, 4)
    assert torch.equal(images(var2, infer_patch_nums=(1, 2, 3)), images(var, infer_patch_nums=(1, 2, 3)))


def test_sampler_defaults_are_stored_and_dtype_applies(tmp_path):
    vae, var = tiny('VIAR')
    save_pretrained(vae, var, tmp_path / 'hub', sampler=SamplerSettings(cfg=3.0, iter_left=6, iter_right=2).to_dict())
    assert hub_sampler_settings(str(tmp_path / 'hub')) == SamplerSettings(cfg=3.0, iter_left=6, iter_right=2)
    assert sampler_defaults(str(tmp_path / 'hub'))['cfg'] == 3.0           # models: the plain dict
    assert read_hub_config(str(tmp_path / 'hub'))['sampler']['iter_left'] == 6
    _, var16 = from_pretrained(str(tmp_path / 'hub'), dtype=torch.bfloat16)
    assert {p.dtype for p in var16.parameters()} == {torch.bfloat16}
    with pytest.raises(HubError, match='sampler defaults: .*not JSON serializable'):
        save_pretrained(vae, var, tmp_path / 'bad', sampler={'top_p': object()})
    save_pretrained(vae, var, tmp_path / 'bad', sampler={'top_k': 'x'})      # stored as given: the reader checks it
    with pytest.raises(UserError, match="config.json sampler: unknown sampler setting"):
        save_pretrained(vae, var, tmp_path / 'bad2', sampler={'topk': 1})
        hub_sampler_settings(str(tmp_path / 'bad2'))


def test_saving_refuses_meta_models_and_foreign_folders(tmp_path):
    vae, var = build_vae_var(device='meta', patch_nums=PNS, V=64, Cvae=8, ch=32, num_classes=3, depth=1)
    with pytest.raises(HubError, match='no weights'):
        save_pretrained(vae, var, tmp_path / 'm')
    vae, var = tiny('VAR')
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('x')
    with pytest.raises(HubError, match=r"holds other files \(notes.txt\)"):
        save_pretrained(vae, var, tmp_path / 'busy')
    save_pretrained(vae, var, tmp_path / 'again')
    save_pretrained(vae, var, tmp_path / 'again')          # a hub folder is overwritten in place
    assert sorted(os.listdir(tmp_path / 'again')) == sorted(HUB_FILES)
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    before = (tmp_path / 'again' / 'model.safetensors').read_bytes()
    with pytest.MonkeyPatch.context() as mp:                # a full disk: one line, the previous weights kept
        mp.setattr(safetensors.torch, 'save_file', full)
        with pytest.raises(HubError, match='disk full while writing .*model.safetensors.*previous'):
            save_pretrained(vae, var, tmp_path / 'again')
    assert sorted(os.listdir(tmp_path / 'again')) == sorted(HUB_FILES)
    assert (tmp_path / 'again' / 'model.safetensors').read_bytes() == before
    var.cast_for_inference(torch.bfloat16)                 # half-precision weights are no checkpoint to share
    with pytest.raises(HubError, match='cast to torch.bfloat16 for sampling'):
        save_pretrained(vae, var, tmp_path / 'cast')
    assert not (tmp_path / 'cast').exists()


def test_missing_foreign_and_offline_sources_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(HubError, match="hub folder 'no/such/dir' not found"):
        from_pretrained('no/such/dir')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(HubError, match='is not a hub folder: config.json and model.safetensors missing'):
        from_pretrained(str(tmp_path / 'empty'))
    (tmp_path / 'f.pth').write_bytes(b'x')
    with pytest.raises(HubError, match='is a file, not a hub folder'):
        from_pretrained(str(tmp_path / 'f.pth'))
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'config.json').write_text('{"model_type": "bert"}')
    (tmp_path / 'other' / 'model.safetensors').write_bytes(b'')
    with pytest.raises(HubError, match='not a hub folder config written by save_pretrained'):
        from_pretrained(str(tmp_path / 'other'))

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError('cannot reach the Hub')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as e:
        from_pretrained('someone/viar-hub')
    msg = str(e.value)
    assert '\n' not in msg and "'someone/viar-hub'" in msg and 'HF_HUB_OFFLINE is set' in msg
    assert 'hf download someone/viar-hub --local-dir DIR' in msg


def test_repo_ids_go_through_the_hub_cache(tmp_path, monkeypatch):
    """A repository id is fetched with snapshot_download (only the three files, the revision passed on)."""
    vae, var = tiny('VAR')
    save_pretrained(vae, var, tmp_path / 'cache')
    calls = []

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda **k: calls.append(k) or str(tmp_path / 'cache'))
    monkeypatch.chdir(tmp_path)
    _, var2 = from_pretrained('org/tiny-var', revision='v1')
    assert calls and all(c['repo_id'] == 'org/tiny-var' and c['revision'] == 'v1' for c in calls)
    assert sorted(calls[0]['allow_patterns']) == sorted(HUB_FILES)
    assert torch.equal(images(var2), images(var))


def test_push_to_hub_uploads_the_three_files(tmp_path, monkeypatch):
    import huggingface_hub
    vae, var = tiny('VIAR')
    seen = {}

    def upload_folder(self, *, repo_id, folder_path, **k):
        seen.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), allow=sorted(k['allow_patterns']))
        seen['images'] = images(from_pretrained(folder_path)[1])
        return 'https://huggingface.co/org/tiny/commit/0'
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **k: seen.update(created=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    url = push_to_hub(vae, var, 'org/tiny', training_data='none')
    assert url.endswith('/commit/0') and seen['created'] == seen['repo_id'] == 'org/tiny'
    assert seen['files'] == seen['allow'] == sorted(HUB_FILES)
    assert torch.equal(seen['images'], images(var))


# ================================ parity vectors through the round trip ===============================================
@pytest.mark.parametrize('name', ['var', 'var_saln', 'viar'])
def test_golden_models_pass_through_the_round_trip(golden_src, name, tmp_path):
    g = vectors.load(golden_src, f'models/{name}.pt')
    c = g['config']
    vae, var = build_vae_var(V=c['V'], Cvae=c['Cvae'], ch=c['ch'], share_quant_resi=c['share_quant_resi'],
                             patch_nums=c['patch_nums'], num_classes=c['num_classes'], depth=c['depth'],
                             shared_aln=c['shared_aln'], attn_l2_norm=c['attn_l2_norm'],
                             use_implicit=c['use_implicit'], pre_depth=c['pre_depth'], post_depth=c['post_depth'])
    vectors.load_into(vae, vectors.vae_state(golden_src))
    vectors.load_into(var, vectors.var_state(golden_src, name))
    save_pretrained(vae, var, tmp_path / name)
    _, var = from_pretrained(str(tmp_path / name))
    for case in g['sampling']:
        img, idx = var.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
        assert len(idx) == len(case['tokens'])
        for si, (got, exp) in enumerate(zip(idx, case['tokens'])):
            assert torch.equal(got, exp), f'{name}: tokens differ at scale {si}'
        if case['image'] is not None:
            assert (img - case['image'].float()).abs().max().item() < 2e-3


def test_golden_flexvar_passes_through_the_round_trip(golden_src, tmp_path):
    g = vectors.load(golden_src, 'flexvar/flexvar.pt')
    c = g['config']
    vae, var = build_flexvar(V=c['V'], Cvae=c['Cvae'], depth=c['depth'], num_classes=c['num_classes'],
                             attn_l2_norm=c['attn_l2_norm'], ch=c['vq_ch'], z_channels=c['z_channels'])
    vae_sd, var_sd = vectors.flex_states(golden_src)
    vectors.load_into(vae, vae_sd)
    vectors.load_into(var, var_sd)
    save_pretrained(vae, var, tmp_path / 'flex')
    _, var = from_pretrained(str(tmp_path / 'flex'))
    for case in g['sampling']:
        img, idx = var.autoregressive_infer_cfg(**case['kwargs'], ret_idx_Bl=True)
        for si, (got, exp) in enumerate(zip(idx, case['tokens'])):
            assert torch.equal(got, exp), f'{case["kwargs"]["infer_patch_nums"]}: tokens differ at scale {si}'
        assert (img - (case['image'].float().clamp(-1, 1) + 1) / 2).abs().max().item() < 2e-3


# ================================ torch.hub ===========================================================================
@pytest.mark.parametrize('entry, kw, n_params', [
    ('var', dict(depth=16), 310_283_520),
    ('var', dict(depth=30), 2_010_020_356),
    ('var', dict(depth=36), 2_353_893_904),
    ('viar', {}, 770_884_426),
    ('flexvar', dict(depth=24), 1_041_314_576),
])
def test_torch_hub_entries_give_the_published_shapes_on_meta(entry, kw, n_params):
    vae, var = torch.hub.load(str(REPO), entry, source='local', pretrained=False, device='meta', **kw)
    assert sum(p.numel() for p in var.parameters()) == n_params
    assert all(t.is_meta for t in (*vae.state_dict().values(), *var.state_dict().values()))
    if entry != 'flexvar':
        assert sum(p.numel() for p in vae.parameters()) == 108_948_355


def test_torch_hub_pretrained_loads_the_published_files(tmp_path, monkeypatch):
    """pretrained=True goes through utils/download.py: files already in ckpt_dir are loaded as they are (the
    architecture read from them); a missing one that cannot be fetched is one MissingCheckpointError line."""
    from utils.download import MissingCheckpointError
    vae, var = tiny('VIAR')
    torch.save(var.state_dict(), tmp_path / VIAR_MODEL)
    torch.save(vae.state_dict(), tmp_path / VAR_TOKENIZER)
    vae2, var2 = torch.hub.load(str(REPO), 'viar', source='local', ckpt_dir=str(tmp_path))
    assert torch.equal(images(var2), images(var))
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(MissingCheckpointError, match=var_file(16)):
        torch.hub.load(str(REPO), 'var', source='local', depth=16, ckpt_dir=str(tmp_path))


# ================================ the sampler settings ================================================================
def test_sampler_tables_are_derived_from_the_dataclass():
    from utils import sampling_utils as su
    known = {'cfg': 'cfg', 'top_k': 'top_k', 'top_p': 'top_p', 'more_smooth': 'more_smooth', 'iter_left': 'iter_left',
             'iter_right': 'iter_right', 'iter_tol': 'iter_tol', 'infer_pn': 'infer_patch_nums', 'max_pn': 'max_pn',
             'used_llamagen_cfg': 'used_llamagen_cfg'}
    assert {f: su.SAMPLER_FLAGS.get(f) for f in known} == known
    assert {'iter_left', 'iter_right', 'iter_tol'} <= set(su.ITERATION_KWARGS)
    assert su.FLEX_KWARGS == {'infer_patch_nums': None, 'max_pn': 16, 'used_llamagen_cfg': False}
    assert set(SamplerSettings.rules()) <= set(su.FLAG_RULES)
    s = SamplerSettings(cfg=2.5, infer_patch_nums=(1, 2, 4))
    assert SamplerSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(SettingsError, match='unknown sampler setting'):
        SamplerSettings.from_dict({'cgf': 1})
    with pytest.raises(SettingsError, match=r'--top_k -1 must be >= 0.*--infer_pn 2_3'):
        SamplerSettings(top_k=-1, infer_patch_nums='2_3').check()
    _, var = tiny('VAR')
    assert SamplerSettings(top_k=900).kwargs(var)['top_k'] == 64           # clamped to the vocabulary
    with pytest.raises(SettingsError, match='--max_pn is a FlexVAR setting'):
        SamplerSettings(max_pn=8).kwargs(var)
    _, flex = tiny('FlexVAR')
    kw = SamplerSettings().kwargs(flex)
    assert kw['infer_patch_nums'] == PNS and kw['max_pn'] == 16 and kw['used_llamagen_cfg'] is False


def test_sweep_uses_the_library_functions_only():
    tree = ast.parse((REPO / 'scripts' / 'sweep.py').read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert 'sampling' not in imported and 'evaluator' not in imported
    private = [f'{n.module}.{a.name}' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names if a.name.startswith('_')]
    assert not private
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == 'Namespace'
                and isinstance(n.value, ast.Name) and n.value.id == 'argparse']


# ================================ the scripts =========================================================================
@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """A tiny VIAR (ckpts var.pth + vae.pth) and the same as a hub folder written by scripts.convert."""
    from scripts import convert
    d = tmp_path_factory.mktemp('hub_scripts')
    vae, var = tiny('VIAR')
    torch.save(var.state_dict(), d / VIAR_MODEL)
    torch.save(vae.state_dict(), d / 'vae.pth')
    assert convert.main(['--var_ckpt', str(d / VIAR_MODEL), '--vae_ckpt', str(d / 'vae.pth'), '--out',
                         str(d / 'tiny-viar'), '--iter_left', '3', '--iter_right', '2']) == 0
    return d


def test_convert_writes_a_hub_folder_and_back_with_a_parity_check(pair, tmp_path, capsys):
    from scripts import convert
    assert sorted(os.listdir(pair / 'tiny-viar')) == sorted(HUB_FILES)
    assert hub_sampler_settings(str(pair / 'tiny-viar')).iter_left == 3
    assert convert.main(['--pretrained', str(pair / 'tiny-viar'), '--out_var', str(tmp_path / 'v.pth'),
                         '--out_vae', str(tmp_path / 'a.pth')]) == 0
    out = capsys.readouterr().out
    assert 'parity check: 2 image(s)' in out and 'are identical' in out
    _, var = load_vae_var(str(tmp_path / 'a.pth'), str(tmp_path / 'v.pth'))
    _, ref = load_vae_var(str(pair / 'vae.pth'), str(pair / VIAR_MODEL))
    assert all(torch.equal(a, b) for a, b in zip(var.state_dict().values(), ref.state_dict().values()))
    assert convert.main(['--pretrained', str(pair / 'tiny-viar')]) == 1
    assert 'pass --out_var FILE.pth and --out_vae' in capsys.readouterr().err


def test_convert_a_training_checkpoint(pair, tmp_path, capsys):
    from scripts import convert
    sd = torch.load(pair / VIAR_MODEL, weights_only=True)
    torch.save({'epoch': 3, 'trainer': {'var_wo_ddp': sd}}, tmp_path / 'ar-ckpt-last.pth')
    assert convert.main(['--var_ckpt', str(tmp_path / 'ar-ckpt-last.pth'), '--vae_ckpt', str(pair / 'vae.pth'),
                         '--out', str(tmp_path / 'h'), '--parity_images', '1']) == 0
    assert 'parity check: 1 image(s)' in capsys.readouterr().out
    assert 'ar-ckpt-last.pth' in (tmp_path / 'h' / 'README.md').read_text()


def read_png(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


def test_gen_img_and_edit_take_pretrained(pair, tmp_path, capsys):
    import gen_img
    from scripts import edit
    common = ['--use_implicit', '--iter_left', '3', '--iter_right', '2', '--class_label', '1', '--seeds', '4',
              '--device', 'cpu']
    run_main(gen_img.main, ['--pretrained', str(pair / 'tiny-viar'), '--output_dir', str(tmp_path / 'a'),
                                     *common])
    run_main(gen_img.main, ['--var_ckpt', str(pair / VIAR_MODEL), '--vae_ckpt', str(pair / 'vae.pth'),
                                     '--output_dir', str(tmp_path / 'b'), *common])
    a, b = tmp_path / 'a' / 'tiny-viar' / 'class1_seed4.png', tmp_path / 'b' / 'viar' / 'class1_seed4.png'
    assert np.array_equal(read_png(a), read_png(b))

    from PIL import Image
    Image.fromarray(read_png(a)).save(tmp_path / 'in.png')
    argv = ['--input_img', str(tmp_path / 'in.png'), '--box', '0,0,0.5,1', '--seeds', '0', '--use_implicit',
            '--device', 'cpu']
    assert edit.main(['--pretrained', str(pair / 'tiny-viar'), '--output_dir', str(tmp_path / 'e1'), *argv]) == 0
    assert edit.main(['--var_ckpt', str(pair / VIAR_MODEL), '--vae_ckpt', str(pair / 'vae.pth'), '--output_dir',
                      str(tmp_path / 'e2'), *argv]) == 0
    r1, r2 = (sorted((tmp_path / e).rglob('*_seed0.png')) for e in ('e1', 'e2'))
    assert len(r1) == len(r2) == 1 and np.array_equal(read_png(r1[0]), read_png(r2[0]))


@pytest.mark.parametrize('argv, message', [
    (['--pretrained', 'nowhere/at-all/x'], "hub folder 'nowhere/at-all/x' not found"),
    (['--pretrained', '{tiny}', '--vae_ckpt', 'x.pth'], 'holds the tokenizer and the transformer: drop --vae_ckpt'),
    (['--pretrained', '{tiny}', '--depth', '4'], 'with depth=2, but depth=4 was asked for: pass --depth 2'),
    (['--pretrained', '{pair}'], 'is not a hub folder: config.json and model.safetensors missing'),
])
def test_gen_img_bad_pretrained_is_one_line(pair, tmp_path, capsys, argv, message):
    import gen_img
    argv = [a.replace('{tiny}', str(pair / 'tiny-viar')).replace('{pair}', str(pair)) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_main(gen_img.main, [*argv, '--output_dir', str(tmp_path / 'o'), '--device', 'cpu'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and message in err[0], err


def test_sampling_sweep_and_fixed_point_take_pretrained(pair, tmp_path, capsys):
    import sampling
    from scripts import fixed_point, sweep
    from utils.folder_sampling import sample_folder
    flags = ['--num_classes', '2', '--per_class', '2', '--batch_size', '2', '--use_implicit', '--iter_left', '3',
             '--iter_right', '2', '--device', 'cpu']
    run_main(sampling.main, ['--pretrained', str(pair / 'tiny-viar'), '--sample_dir', str(tmp_path / 's1'),
                                       *flags])
    run_main(sampling.main, ['--ckpt_path', str(pair / VIAR_MODEL), '--vae_ckpt', str(pair / 'vae.pth'),
                                       '--sample_dir', str(tmp_path / 's2'), *flags])
    npz1 = tmp_path / 's1' / 'implicit-tiny-viar-cfg-1.5-seed-1.npz'
    npz2 = tmp_path / 's2' / f'implicit-{VIAR_MODEL}-cfg-1.5-seed-1.npz'
    with np.load(npz1) as z1, np.load(npz2) as z2:
        assert z1['arr_0'].shape == (4, 64, 64, 3) and np.array_equal(z1['arr_0'], z2['arr_0'])
    rec = json.loads((tmp_path / 's1' / 'implicit-tiny-viar-cfg-1.5-seed-1' / 'sampling_config.json').read_text())
    assert rec['pretrained'] == 'tiny-viar' and len(rec['weights_sha256']) == 64

    # the library function: the same images from Python, resumable (a second call writes nothing)
    vae, var = from_pretrained(str(pair / 'tiny-viar'))
    npz3 = sample_folder(vae, var, str(tmp_path / 'lib' / 'x'), 2, 2, 1, batch_size=2, iter_left=3, iter_right=2)
    with np.load(npz3) as z3, np.load(npz2) as z2:
        assert np.array_equal(z3['arr_0'], z2['arr_0'])
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / 'lib' / 'x').glob('*.png')}
    sample_folder(vae, var, str(tmp_path / 'lib' / 'x'), 2, 2, 1, batch_size=2, iter_left=3, iter_right=2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / 'lib' / 'x').glob('*.png')} == mtimes
    from utils.sampling_utils import SamplingError
    with pytest.raises(SamplingError, match='other settings'):
        sample_folder(vae, var, str(tmp_path / 'lib' / 'x'), 2, 2, 1, batch_size=2, iter_left=4, iter_right=2)

    assert sweep.main(['--pretrained', str(pair / 'tiny-viar'), '--schedules', '3-2', '--num_classes', '2',
                       '--per_class', '2', '--batch_size', '2', '--time_batches', '1', '--time_warmup', '0',
                       '--device', 'cpu', '--out', str(tmp_path / 'sw')]) == 0
    row = json.loads((tmp_path / 'sw' / 'sweep.json').read_text())['points'][0]
    with np.load(row['npz']) as z, np.load(npz2) as z2:
        assert np.array_equal(z['arr_0'], z2['arr_0'])

    assert fixed_point.main(['--pretrained', str(pair / 'tiny-viar'), '--classes', '0', '--per_class', '1',
                             '--batch_size', '1', '--max_iters', '3', '--ref_iters', '2', '--token_iters', '1,2',
                             '--device', 'cpu', '--out', str(tmp_path / 'fp')]) == 0
    doc = json.loads((tmp_path / 'fp.json').read_text())
    assert doc['var_ckpt'] == str(pair / 'tiny-viar') and doc['vae_ckpt'] is None
    capsys.readouterr()
    assert fixed_point.main(['--pretrained', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'fp2')]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'not found' in err[0]


def test_models_package_exports_the_hub_functions():
    assert {'save_pretrained', 'from_pretrained', 'push_to_hub'} <= set(models.__all__)
