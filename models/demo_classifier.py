"""The demo's stand-in for the FID evaluator's Inception network: a small CNN that says which demo class an image shows.

``train_classifier`` fits a ``DemoClassifier`` on the demo's training split in seconds on a CPU; ``demo.py`` then
measures how often generated samples are classified as the class they were asked for (and, as the ceiling, how often
the tokenizer's reconstructions of real validation images are).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DemoClassifier', 'train_classifier', 'classify']


class DemoClassifier(nn.Module):
    """Four 3x3 conv layers (three 2x poolings) and a linear head over the pooled features, for images in [-1, 1] of
    any side divisible by 8 (about 60k parameters at the default width)."""

    def __init__(self, num_classes: int, width: int = 24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B3HW).mean(dim=(2, 3)))


def _augment(x_B3HW: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and a shift of up to an eighth of the side (samples are not pixel-aligned with the
    training images)."""
    B, s = x_B3HW.shape[0], max(1, x_B3HW.shape[-1] // 8)
    flip = torch.rand(B, generator=g) < 0.5
    x_B3HW = torch.where(flip[:, None, None, None], x_B3HW.flip(3), x_B3HW)
    dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=g))
    return torch.roll(x_B3HW, shifts=(dy, dx), dims=(2, 3))


def train_classifier(x_B3HW: torch.Tensor, y_B: torch.Tensor, num_classes: int, steps: int = 150, bs: int = 64,
                     seed: int = 0, lr: float = 3e-3, verbose: bool = False) -> DemoClassifier:
    """Fits a ``DemoClassifier`` (AdamW, augmented mini-batches drawn with ``seed``); returns it in eval mode.  The
    global RNG is left as it was."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DemoClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x_B3HW.shape[0], (bs,), generator=g)
        loss = F.cross_entropy(model(_augment(x_B3HW[idx], g)), y_B[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and (step + 1) % 50 == 0:
            print(f'[classifier] step {step + 1}/{steps} loss {loss.item():.4f}', flush=True)
    return model.eval()


@torch.no_grad()
def classify(model: DemoClassifier, x_B3HW: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """The predicted class of each image (images in [-1, 1])."""
    return torch.cat([model(x_B3HW[i:i + bs]).argmax(1) for i in range(0, x_B3HW.shape[0], bs)])
