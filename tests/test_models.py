"""Architecture, checkpoint loading, JFB memory and KV-cache behaviour of the models (no parity vectors needed
except for the published key listing)."""
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F

import models
from models import PATCH_NUMS_512, build_vae_var, iterations_per_scale
from models.checkpoint import CheckpointError, infer_var_config, load_vae_var
from models.var import published_key
from tests.golden import vectors

PUBLISHED = {
    'var_d16': dict(depth=16), 'var_d20': dict(depth=20), 'var_d24': dict(depth=24), 'var_d30': dict(depth=30),
    'var_d36_512': dict(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
    'viar_d30': dict(depth=30, use_implicit=True, pre_depth=5, post_depth=5),
}
TINY = dict(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=3)


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_architectures_match_official_keys_parity(golden_src, name):
    official = vectors.published_keys(golden_src, 'official_keys')
    vae, var = build_vae_var(device='meta', **PUBLISHED[name])      # no allocation: 2B parameters cost nothing
    got = {k: list(v.shape) for k, v in var.state_dict().items()}
    assert list(got) == list(official[name]['keys'])                 # same keys, same order
    assert got == official[name]['keys']
    assert sum(p.numel() for p in var.parameters()) == official[name]['num_params']
    assert infer_var_config(var.state_dict(), name) == {**dict(
        num_classes=1000, patch_nums=models.PATCH_NUMS_256, shared_aln=False, attn_l2_norm=True, use_implicit=False,
        pre_depth=0, post_depth=0, V=4096, Cvae=32), **PUBLISHED[name]}
    if name == 'var_d30':
        vae_keys = {k: list(v.shape) for k, v in vae.state_dict().items()}
        assert vae_keys == official['vae_ch160v4096z32']['keys']
        assert sum(p.numel() for p in vae.parameters()) == official['vae_ch160v4096z32']['num_params']


def test_viar_is_38_percent_of_var_d30():
    _, var = build_vae_var(device='meta', depth=30)
    _, viar = build_vae_var(device='meta', depth=30, use_implicit=True)
    ratio = sum(p.numel() for p in viar.parameters()) / sum(p.numel() for p in var.parameters())
    assert abs(ratio - 0.3835) < 5e-4


def test_iteration_schedule_is_numpy_linspace_cast_toward_zero():
    assert iterations_per_scale(10, 10, 10) == [10] * 10
    assert iterations_per_scale(6, 2, 10) == [6, 5, 5, 4, 4, 3, 3, 2, 2, 2]
    assert iterations_per_scale(2, 5, 10) == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    with pytest.raises(ValueError):
        iterations_per_scale(-1, 3, 10)


# ----------------------------------------------------------------------------------------------------------------------
def published_params(var):
    """The parameters by their published (state-dict) names."""
    return {published_key(k): p for k, p in var.named_parameters()}


def tiny(use_implicit, depth=2, **kw):
    torch.manual_seed(0)
    vae, var = build_vae_var(depth=depth, use_implicit=use_implicit, pre_depth=1, post_depth=1, **TINY, **kw)
    # a fresh init has tiny AdaLN gammas (1e-5): make the blocks matter so the tests see their effect
    with torch.no_grad():
        for b in var.all_blocks():
            b.ada_lin[-1].weight.normal_(0, 0.05)
        var.head.weight.normal_(0, 0.5)
    return vae, var.eval()


@pytest.mark.parametrize('use_implicit', [False, True])
def test_kv_cached_sampler_agrees_with_teacher_forcing(use_implicit):
    """Greedy sampling (top_k=1, cfg=0) with KV caches must pick, at every scale, the argmax of the block-causal
    teacher-forcing logits computed on the tokens it drew. For VIAR with a constant schedule n->n the per-iteration
    caches are exactly the teacher-forcing computation with n gradient steps."""
    vae, var = tiny(use_implicit)
    var.cond_drop_rate = 0.0
    n = 3
    labels = torch.tensor([0, 2])
    img, idx_per_scale = var.autoregressive_infer_cfg(2, labels, g_seed=0, cfg=0.0, top_k=1, iter_left=n,
                                                      iter_right=n, ret_idx_Bl=True)
    assert img.shape == (2, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    with torch.no_grad():
        logits_BLV = var(labels, vae.quantize.idxBl_to_var_input(idx_per_scale), iters=(0, n) if use_implicit else None)
    assert torch.equal(logits_BLV.argmax(-1), torch.cat(idx_per_scale, dim=1))


def test_implicit_iterations_change_the_output_and_caches_are_freed():
    vae, var = tiny(True)
    imgs = [var.autoregressive_infer_cfg(2, torch.tensor([1, 1]), g_seed=3, cfg=1.5, iter_left=l, iter_right=r)
            for l, r in [(4, 4), (4, 1), (4, 4)]]
    assert torch.equal(imgs[0], imgs[2])            # seeded: reproducible
    assert not torch.equal(imgs[0], imgs[1])        # the knob matters
    for b in var.all_blocks():                      # caches released after sampling
        assert b.attn.cache_nbytes() == 0 and not b.attn.caching


def test_more_smooth_and_unconditional_and_random_labels_run():
    vae, var = tiny(True)
    for label in (None, -1, 2):
        img = var.autoregressive_infer_cfg(3, label, g_seed=1, top_k=10, top_p=0.9, more_smooth=True,
                                           iter_left=2, iter_right=1)
        assert img.shape == (3, 3, 64, 64) and torch.isfinite(img).all()


def test_bf16_autocast_on_cpu_samples():
    vae, var = tiny(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        img = var.autoregressive_infer_cfg(2, torch.tensor([0, 1]), g_seed=0, iter_left=2, iter_right=2)
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()


# ----------------------------------------------------------------------------------------------------------------------
class SavedActivationMeter:
    """Peak live bytes of the tensors autograd saves for backward (parameters excluded): the activation memory
    of a training step, measured the same way on any device."""

    def __init__(self, module):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.live, self.peak, self.refs = 0, 0, {}

    def _release(self, ptr, nbytes):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nbytes

    def pack(self, t):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.param_ptrs:
            return t
        box = [t]
        holder = _Holder(box)
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        weakref.finalize(holder, self._release, ptr, nbytes)
        return holder

    @staticmethod
    def unpack(x):
        return x.box[0] if isinstance(x, _Holder) else x


class _Holder:
    __slots__ = ('box', '__weakref__')

    def __init__(self, box):
        self.box = box


def step_activation_peak(var, vae, iters):
    torch.manual_seed(0)
    B = 2
    x_BLCv = torch.randn(B, var.L - var.first_l, vae.Cvae)
    labels = torch.tensor([0, 1])
    gt_BL = torch.randint(0, vae.vocab_size, (B, var.L))
    meter = SavedActivationMeter(var)
    var.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        logits = var(labels, x_BLCv, iters=iters)
        loss = F.cross_entropy(logits.view(-1, vae.vocab_size), gt_BL.view(-1))
    loss.backward()
    assert var.implicit_block.attn.mat_qkv.weight.grad is not None
    return meter.peak


def test_jfb_memory_flat_in_no_grad_steps_and_linear_in_grad_steps():
    vae, var = tiny(True, depth=4)
    var.train()
    for b in var.all_blocks():
        b.drop_path.drop_prob = 0.0 if hasattr(b.drop_path, 'drop_prob') else None
    peak0 = step_activation_peak(var, vae, (0, 2))
    peak10 = step_activation_peak(var, vae, (10, 2))
    assert peak10 <= 1.15 * peak0, (peak0, peak10)
    g1, g2, g4 = (step_activation_peak(var, vae, (0, n)) for n in (1, 2, 4))
    per_step = g2 - g1
    assert per_step > 0
    assert abs((g4 - g2) - 2 * per_step) <= 0.05 * per_step, (g1, g2, g4)


def test_jfb_gradients_reach_pre_blocks_through_the_injection():
    vae, var = tiny(True)
    var.train()
    logits = var(torch.tensor([0, 1]), torch.randn(2, var.L - 1, vae.Cvae), iters=(3, 1))
    logits.square().mean().backward()
    for name in ('pre_blocks.0.attn.mat_qkv.weight', 'implicit_block.ffn.fc1.weight',
                 'implicit_block_projection.0.weight', 'post_blocks.0.ffn.fc2.weight'):
        assert published_params(var)[name].grad.abs().sum() > 0, name


def test_iteration_range_attributes():
    _, var = build_vae_var(device='meta', depth=4, use_implicit=True, pre_depth=1, post_depth=1)
    assert (var.implicit_no_grad_min_iters, var.implicit_no_grad_max_iters,
            var.implicit_with_grad_min_iters, var.implicit_with_grad_max_iters) == (0, 10, 1, 12)
    var.implicit_no_grad_max_iters = 3
    assert var.backbone.implicit_no_grad_max_iters == 3
    import random
    random.seed(0)
    draws = {var.backbone.draw_iters() for _ in range(200)}
    assert {n0 for n0, _ in draws} == {0, 1, 2, 3} and {n1 for _, n1 in draws} == set(range(1, 13))


# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpts')
    vae, var = tiny(False)
    _, viar = tiny(True)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    torch.save({'epoch': 3, 'iter': 10, 'trainer': {'var_wo_ddp': viar.state_dict(), 'vae_local': vae.state_dict()},
                'args': {'depth': 2}}, d / 'viar_train.pth')
    raw = (d / 'var.pth').read_bytes()
    (d / 'truncated.pth').write_bytes(raw[: len(raw) // 3])
    (d / 'notes.pth').write_text('this is not a checkpoint\n')
    (d / 'random.pth').write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8).numpy().tobytes())
    with open(d / 'evil.pth', 'wb') as f:
        pickle.dump({'x': _Evil()}, f)
    torch.save({'some': 'dict'}, d / 'nomodel.pth')
    return d


class _Evil:
    def __reduce__(self):
        return (print, ('code ran',))


def test_loader_infers_architecture_from_either_form(ckpt_dir):
    vae, var = load_vae_var(str(ckpt_dir / 'vae.pth'), str(ckpt_dir / 'var.pth'))
    assert not var.use_implicit and var.depth == 2 and var.num_classes == 3 and var.patch_nums == (1, 2, 3, 4)
    vae, viar = load_vae_var(str(ckpt_dir / 'vae.pth'), str(ckpt_dir / 'viar_train.pth'), expect={'depth': 2})
    assert viar.use_implicit and viar.pre_depth == 1 and viar.post_depth == 1
    assert not any(p.is_meta for p in viar.parameters()) and not any(b.is_meta for b in viar.buffers())
    img = viar.autoregressive_infer_cfg(1, 0, g_seed=0, iter_left=2, iter_right=2)
    assert img.shape == (1, 3, 64, 64)


@pytest.mark.parametrize('var_file, expect, message', [
    ('missing.pth', None, 'not found'),
    ('truncated.pth', None, 'is not a PyTorch checkpoint'),
    ('notes.pth', None, 'is not a PyTorch checkpoint'),
    ('random.pth', None, 'is not a PyTorch checkpoint'),
    ('evil.pth', None, 'for safety'),
    ('nomodel.pth', None, 'not a model state dict'),
    ('vae.pth', None, 'tokenizer (VQVAE) checkpoint, not a VAR/VIAR one'),
    ('viar_train.pth', {'depth': 16},
     'holds a VIAR model (depth 2: 1 pre + 1 implicit + 1 post blocks) with depth=2, but depth=16 was asked for'),
    ('viar_train.pth', {'use_implicit': False}, 'holds a VIAR model'),
    ('var.pth', {'use_implicit': True}, 'holds a VAR model (depth 2), but VIAR was asked for'),
])
def test_bad_checkpoints_end_in_one_clear_message(ckpt_dir, capsys, var_file, expect, message):
    with pytest.raises(CheckpointError) as e:
        load_vae_var(str(ckpt_dir / 'vae.pth'), str(ckpt_dir / var_file), expect=expect)
    assert message in str(e.value)
    assert str(ckpt_dir / var_file) in str(e.value)
    assert '\n' not in str(e.value)
    assert 'weights_only=False' not in str(e.value)     # never pass on the unsafe advice
    assert 'code ran' not in capsys.readouterr().out


def test_tokenizer_mismatch_is_reported(ckpt_dir, tmp_path):
    torch.manual_seed(0)
    other_vae, _ = build_vae_var(V=32, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=3, depth=2)
    torch.save(other_vae.state_dict(), tmp_path / 'vae32.pth')
    with pytest.raises(CheckpointError, match='tokenizer with V=64'):
        load_vae_var(str(tmp_path / 'vae32.pth'), str(ckpt_dir / 'var.pth'))
    with pytest.raises(CheckpointError, match='not a tokenizer'):
        load_vae_var(str(ckpt_dir / 'var.pth'), str(ckpt_dir / 'var.pth'))


# ----------------------------------------------------------------------------------------------------------------------
def test_plain_var_has_no_implicit_attributes():
    _, var = build_vae_var(device='meta', depth=2)
    for name in models.var.IMPLICIT_ATTRS:
        with pytest.raises(AttributeError, match='no implicit block'):
            getattr(var, name)
        with pytest.raises(AttributeError, match='no implicit block'):
            setattr(var, name, 3)
    assert getattr(var, 'implicit_eval_iters', None) is None
    assert var.backbone.draw_iters() is None and var.backbone.schedule(10, 10, 4) == [0, 0, 0, 0]


def test_eval_mode_uses_pinned_iteration_attributes_else_the_eval_count():
    """The official forward draws (n0, n1) from the attributes in eval mode too; pinned ranges (min == max) give those
    counts here, unpinned ones the deterministic (0, implicit_eval_iters)."""
    vae, var = tiny(True)
    var.cond_drop_rate = 0.0
    x, labels = torch.randn(2, var.L - 1, vae.Cvae), torch.tensor([0, 1])
    with torch.no_grad():
        by_iters = {it: var(labels, x, iters=it) for it in [(0, 10), (3, 2), (0, 4)]}
        assert torch.equal(var(labels, x), by_iters[(0, 10)])            # unpinned: deterministic (0, eval_iters)
        var.implicit_no_grad_min_iters = var.implicit_no_grad_max_iters = 3
        var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = 2
        assert torch.equal(var(labels, x), by_iters[(3, 2)])
        var.implicit_no_grad_min_iters, var.implicit_no_grad_max_iters = 0, 10     # n0 unpinned, n1 pinned
        var.implicit_with_grad_min_iters = var.implicit_with_grad_max_iters = 4
        assert torch.equal(var(labels, x), by_iters[(0, 4)])


@pytest.mark.parametrize('use_implicit', [False, True])
def test_activation_checkpointing_gives_identical_gradients(use_implicit):
    vae, var = tiny(use_implicit, depth=4)
    var.train()      # drop path on: checkpointing must replay the same random masks
    x, labels = torch.randn(2, var.L - 1, vae.Cvae), torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        var.set_grad_checkpointing(ckpt)
        var.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logits = var(labels, x, iters=(2, 3) if use_implicit else None)
        logits.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in var.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_top_k_above_the_vocabulary_keeps_every_token():
    vae, var = tiny(False)
    a = var.autoregressive_infer_cfg(1, 0, g_seed=0, top_k=10 ** 6)
    b = var.autoregressive_infer_cfg(1, 0, g_seed=0, top_k=0)
    assert torch.equal(a, b)


def test_phi_ticks_follow_the_official_rule_for_shared_and_per_scale_phis():
    """The official code places K phis at linspace(1/(3K), 1 - 1/(3K), K) when K == 4, else linspace(1/(2K), ...),
    for the partially shared AND the per-scale (share_quant_resi=0) variant: with 4 per-scale phis, scale 2 of 10
    takes phi 1 (the 1/(2K) rule would pick phi 0)."""
    import numpy as np

    from models.quant import VectorQuantizer2, phi_ticks
    assert np.allclose(phi_ticks(4), np.linspace(1 / 12, 11 / 12, 4))
    assert np.allclose(phi_ticks(5), np.linspace(1 / 10, 9 / 10, 5))
    for share in (0, 4):
        q = VectorQuantizer2(16, 4, default_qresi_counts=4, share_quant_resi=share)
        phis = list(q.quant_resi.qresi_ls if share else q.quant_resi)
        assert len(phis) == 4
        assert [phis.index(q.phi(si, 10)) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
