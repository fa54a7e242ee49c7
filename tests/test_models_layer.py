"""The models layer: the backbone is a registered submodule whose state-dict keys stay the published ones, and the
sampler internals are shared by VAR and FlexVAR."""
import ast
import random
import re
from pathlib import Path

import pytest
import torch

from models import build_flexvar, build_vae_var
from models.var import published_key
from tests.golden import vectors
from utils.lr_control import param_groups

TINY_VAR = dict(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=3, depth=2, pre_depth=1, post_depth=1)
TINY_FLEX = dict(V=64, Cvae=8, ch=32, z_channels=32, num_classes=3, depth=2, pre_depth=1, post_depth=1,
                 patch_nums=(1, 2, 3, 4))
FAMILIES = ['VAR', 'VIAR', 'FlexVAR', 'implicit FlexVAR']


def build(family: str, device='cpu'):
    torch.manual_seed(0)
    implicit = family in ('VIAR', 'implicit FlexVAR')
    if 'Flex' in family:
        return build_flexvar(use_implicit=implicit, device=device, **TINY_FLEX)
    return build_vae_var(use_implicit=implicit, device=device, **TINY_VAR)


def param_keys(var):
    """The state-dict keys that are parameters, in state-dict order."""
    return [k for k, v in var.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)]


# ================================ the backbone is a submodule ========================================================
@pytest.mark.parametrize('family', FAMILIES)
def test_train_and_eval_reach_every_submodule(family):
    _, var = build(family)
    assert var.backbone in set(var.children())
    var.eval()
    assert not any(m.training for m in var.modules())
    var.train()
    assert all(m.training for m in var.modules())
    assert var.backbone.training


def test_implicit_backbone_follows_the_model_mode():
    """Eval mode: the deterministic iteration counts (no draw from Python's RNG); training mode: drawn."""
    _, var = build('VIAR')
    x = torch.randn(2, var.L - 1, 8)
    var.eval()
    state = random.getstate()
    with torch.no_grad():
        var(torch.tensor([0, 1]), x)
    assert random.getstate() == state
    var.train()
    var(torch.tensor([0, 1]), x)
    assert random.getstate() != state


@pytest.mark.parametrize('family', FAMILIES)
def test_to_and_parameters_reach_the_backbone(family):
    _, var = build(family)
    backbone_params = {id(p) for p in var.backbone.parameters()}
    assert backbone_params and backbone_params <= {id(p) for p in var.parameters()}
    var.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in var.backbone.parameters())


# ================================ published keys =====================================================================
@pytest.mark.parametrize('family', FAMILIES)
def test_state_dict_has_published_keys_and_round_trips(family, tmp_path):
    _, var = build(family)
    sd = var.state_dict()
    assert not any('backbone' in k for k in sd)
    assert [published_key(k) for k, _ in var.named_parameters()] == param_keys(var)    # same order, published names
    assert not any(k.startswith('backbone') for k in getattr(sd, '_metadata', {}))
    torch.save(sd, tmp_path / 'm.pth')
    _, other = build(family, device='meta')
    other.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True), strict=True, assign=True)
    assert list(other.state_dict()) == list(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))


def test_load_errors_name_the_published_keys():
    _, var = build('VIAR')
    sd = var.state_dict()
    sd.pop('pre_blocks.0.attn.proj.weight')
    sd['post_blocks.9.extra'] = torch.zeros(1)
    with pytest.raises(RuntimeError) as e:
        var.load_state_dict(sd, strict=True)
    msg = str(e.value)
    assert '"pre_blocks.0.attn.proj.weight"' in msg and '"post_blocks.9.extra"' in msg and 'backbone' not in msg
    result = var.load_state_dict(sd, strict=False)
    assert result.missing_keys == ['pre_blocks.0.attn.proj.weight']
    assert result.unexpected_keys == ['post_blocks.9.extra']


def test_wrapped_model_keeps_published_keys_under_its_prefix():
    _, var = build('VIAR')
    outer = torch.nn.ModuleDict({'module': var})
    keys = list(outer.state_dict())
    assert keys == ['module.' + k for k in var.state_dict()]
    outer.load_state_dict(outer.state_dict(), strict=True)


@pytest.mark.parametrize('name', ['var_d16', 'viar_d30'])
def test_parameter_order_is_the_published_order_parity(golden_src, name):
    """Optimizer states of training checkpoints are stored by parameter position: the order must be the published
    (and the previous code's) state-dict order."""
    official = vectors.published_keys(golden_src, 'official_keys')[name]['keys']
    kw = dict(depth=30, use_implicit=True) if name == 'viar_d30' else dict(depth=16)
    _, var = build_vae_var(device='meta', **kw)
    buffers = {published_key(k) for k, _ in var.named_buffers()}
    assert [published_key(k) for k, _ in var.named_parameters()] == [k for k in official if k not in buffers]


def test_a_training_checkpoint_of_published_names_resumes_by_position(tmp_path):
    """A training checkpoint as train.py writes it (model state under published keys, AdamW state by position)
    resumes: every parameter gets the optimizer state of the parameter of the same published name."""
    _, var = build('VIAR')
    opt = torch.optim.AdamW(param_groups(var)[1], lr=1e-3)
    var.train()
    var(torch.tensor([0, 1]), torch.randn(2, var.L - 1, 8), iters=(1, 1)).square().mean().backward()
    opt.step()
    name_of = {id(p): published_key(k) for k, p in var.named_parameters()}
    saved = {name_of[id(p)]: s['exp_avg'].clone() for p, s in opt.state.items()}
    torch.save({'trainer': {'var_wo_ddp': var.state_dict(), 'var_opt': {'optimizer': opt.state_dict()}}},
               tmp_path / 'ar-ckpt-last.pth')

    ckpt = torch.load(tmp_path / 'ar-ckpt-last.pth', weights_only=True)
    _, var2 = build('VIAR')
    var2.load_state_dict(ckpt['trainer']['var_wo_ddp'], strict=True)
    opt2 = torch.optim.AdamW(param_groups(var2)[1], lr=1e-3)
    opt2.load_state_dict(ckpt['trainer']['var_opt']['optimizer'])
    for k, p in var2.named_parameters():
        assert torch.equal(opt2.state[p]['exp_avg'], saved[published_key(k)]), k


# ================================ one builder per role, one sampler ==================================================
def test_build_var_builds_the_family_of_its_tokenizer():
    import models
    vae, flex = build('FlexVAR')
    other = models.build_var(vae, depth=2, num_classes=3, patch_nums=(1, 2, 3, 4), pre_depth=1, post_depth=1)
    assert type(other) is type(flex) is models.FlexVAR
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in flex.state_dict().items()}
    vae, var = build('VAR')
    assert type(models.build_var(vae, depth=2, num_classes=3, patch_nums=(1, 2, 3, 4))) is models.VAR
    assert not hasattr(models, 'build_flex_var')


def test_sampler_internals_are_keyword_only():
    import inspect

    from models import VAR, FlexVAR
    params = inspect.signature(VAR._sample).parameters
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == ['self', 'B', 'label_B']
    assert 'fp' in params and params['fp'].kind is inspect.Parameter.KEYWORD_ONLY
    assert FlexVAR._sample is VAR._sample


# ================================ layers: models imports no application code, says nothing of flags =================
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in REPO.glob('*.py')} | {'scripts', 'utils', 'tests'}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize('path', sorted((REPO / 'models').glob('*.py')), ids=lambda p: p.name)
def test_models_import_no_utils_nor_scripts(path):
    tree = ast.parse(path.read_text())
    bad = [m for m in _imports(tree) if m.split('.')[0] in SCRIPTS]
    assert not bad, f'{path.name} imports {bad}'
    for node in ast.walk(tree):         # the models' error messages say what is wrong, never which flag to pass
        if isinstance(node, ast.Raise) and node.exc is not None:
            texts = [c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            assert not [t for t in texts if re.search(r'(^|\s|\()--[a-z]', t)], (path.name, node.lineno, texts)


def test_model_errors_become_one_line_advice():
    from models.errors import ArchitectureMismatch, CheckpointError, ModelError
    from utils.errors import UserError
    from utils.model_io import model_errors
    assert issubclass(CheckpointError, ModelError) and issubclass(ModelError, ValueError)
    assert not issubclass(ModelError, UserError)
    with pytest.raises(UserError, match=r"^'v.pth' holds a VAR model \(depth 2\), but VIAR was asked for: drop "
                                        r"--use_implicit, or pass the matching checkpoint$") as e:
        with model_errors({'use_implicit': '--use_implicit'}):
            raise ArchitectureMismatch("'v.pth' holds a VAR model (depth 2), but VIAR was asked for", 'use_implicit',
                                       False, True, 'a VAR model (depth 2)')
    assert isinstance(e.value.__cause__, ArchitectureMismatch)
    with pytest.raises(UserError, match=r'with depth=2, but depth=16 was asked for: pass --depth 2 \(or leave it out'):
        with model_errors():
            raise ArchitectureMismatch("'v.pth' holds ... with depth=2, but depth=16 was asked for", 'depth', 2, 16, '')
    with pytest.raises(UserError, match=r'^x$'):
        with model_errors():
            raise CheckpointError('x')


def test_missing_perceptual_weights_are_one_line_with_the_flag(monkeypatch):
    """train_vae.py --lp: the VGG16 weights that cannot be loaded are the models' error, the flag the scripts'."""
    import torchvision

    from models.errors import WeightsUnavailable
    from models.vq_losses import VGGPerceptual
    from utils.errors import UserError
    from utils.model_io import model_errors

    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.models, 'vgg16', offline)
    with pytest.raises(WeightsUnavailable) as e:
        VGGPerceptual()
    assert 'vgg16-397923af.pth' in str(e.value) and '--' not in str(e.value)
    with pytest.raises(UserError, match=r'vgg16-397923af.pth.*: or pass --lp 0 \(no perceptual loss\)$'):
        with model_errors():
            VGGPerceptual()


def test_ddp_wrapper_keeps_published_keys_and_reaches_the_backbone(tmp_path):
    import torch.distributed as tdist
    if tdist.is_initialized():
        pytest.skip('a process group is already set up in this process')
    tdist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        _, var = build('VIAR')
        ddp = torch.nn.parallel.DistributedDataParallel(var)
        assert list(ddp.state_dict()) == ['module.' + k for k in var.state_dict()]
        ddp.eval()
        assert not var.backbone.training and not var.implicit_block.training
        ddp.train()
        ddp(torch.tensor([0, 1]), torch.randn(2, var.L - 1, 8), iters=(1, 1)).square().mean().backward()
        assert var.implicit_block.attn.mat_qkv.weight.grad is not None
    finally:
        tdist.destroy_process_group()
