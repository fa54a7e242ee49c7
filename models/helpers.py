"""Sampling helpers and stochastic depth, shared by the transformer and its sampler."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['sample_with_top_k_top_p_', 'gumbel_softmax_with_rng', 'DropPath']


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng=None,
                             num_samples: int = 1) -> torch.Tensor:
    """Draws token indices (B, l, num_samples).

    Filters ``logits_BlV`` IN PLACE: the -inf written by top-k / top-p stay in the caller's tensor (the
    ``more_smooth`` path of the sampler uses the filtered logits).  The draw is
    ``torch.multinomial(softmax(logits).view(-1, V), n, replacement=True, generator=rng)``: that exact call decides
    which tokens a seed gives, so it must not change.  ``rng`` may be a list of B generators (per-image seeds): image
    b's tokens are then drawn by the same call on its own (l, V) rows with generator b.
    """
    B, l, V = logits_BlV.shape
    if top_k > 0:
        kth_largest_Bl1 = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest_Bl1, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_to_remove[..., -1:] = False          # never drop the most likely token
        logits_BlV.masked_fill_(sorted_to_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_to_remove), -torch.inf)
    replacement = num_samples >= 0
    num_samples = abs(num_samples)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    if isinstance(rng, (list, tuple)):      # one generator per image: the draw of image b is that of b alone
        idx_N = torch.cat([torch.multinomial(p_lV, num_samples=num_samples, replacement=replacement, generator=g)
                           for p_lV, g in zip(probs_NV.view(B, l, V), rng)])
    else:
        idx_N = torch.multinomial(probs_NV, num_samples=num_samples, replacement=replacement, generator=rng)
    return idx_N.view(B, l, num_samples)


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, rng: torch.Generator = None) -> torch.Tensor:
    """``F.gumbel_softmax`` whose noise comes from ``rng`` (exponential draws), so that a seed fixes the result; a
    list of generators: one per entry of the first dimension."""
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, eps=eps, dim=dim)
    if isinstance(rng, (list, tuple)):
        gumbels = torch.cat([-torch.empty_like(x, memory_format=torch.legacy_contiguous_format)
                             .exponential_(generator=g).log() for x, g in zip(logits.split(1), rng)])
    else:
        gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
            generator=rng).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: survivors are scaled by 1/keep_prob)."""
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob:g}'
