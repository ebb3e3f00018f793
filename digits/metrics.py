"""Image-quality metrics of the quality benchmark, in the feature space of a digit classifier that the
benchmark trains itself (no downloaded network: Inception features mean nothing on 8x8 digits).

  Fréchet distance (FD)   distance between Gaussians fitted to real and generated features (as FID)
  precision / recall      k-NN manifold estimates (Kynkäänniemi et al. 2019, k = 3): the share of
                          generated samples inside the real manifold (fidelity) and of real samples
                          inside the generated one (diversity / coverage)
  accuracy                the share of samples the classifier reads as the class the prompt asked for

Pure functions of tensors; nothing here knows about diffusion models or ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FEATURE_DIM = 64
NEIGHBOURS = 3


class DigitClassifier(nn.Module):
    """A small CNN on [N, 8, 8] images in [0, 1]; `features` is the penultimate layer."""

    def __init__(self, feature_dim: int = FEATURE_DIM, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images[:, None].float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero fill): the classifier then judges a generated
    digit that sits a pixel off centre by its shape, not by its position."""
    n = images.shape[0]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None])[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None])[:, None, :].expand(n, 8, 8)
    return padded[torch.arange(n)[:, None, None], rows, cols]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 40,
                     batch_size: int = 64, learning_rate: float = 2e-3) -> DigitClassifier:
    torch.manual_seed(seed)  # layer initialisation
    model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    with torch.inference_mode(False):
        model.train()
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(model(_shift(images[idx], gen)), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor):
    """(features [N, FEATURE_DIM], predicted labels [N]) in float64 / int64."""
    feats = model.features(images)
    return feats.double(), model.head(feats).argmax(dim=1)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), features as rows. The
    symmetric form needs only eigendecompositions of PSD matrices (stable for rank-deficient
    covariances, which ReLU features with dead units have)."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(mu @ mu + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def _kth_neighbour_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    dist = torch.cdist(feats, feats)
    return dist.kthvalue(k + 1, dim=1).values  # +1: a point's nearest neighbour is itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fake samples within the k-NN ball of some real
    sample; recall = share of real samples within the k-NN ball of some fake sample."""
    real_radius = _kth_neighbour_radius(real, k)
    fake_radius = _kth_neighbour_radius(fake, k)
    cross = torch.cdist(fake, real)  # [fake, real]
    precision = (cross <= real_radius[None, :]).any(dim=1).double().mean()
    recall = (cross.T <= fake_radius[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


@dataclass
class Reference:
    """What generated samples are compared with: features of held-out real digits."""
    classifier: DigitClassifier
    features: torch.Tensor

    @classmethod
    def from_images(cls, classifier: DigitClassifier, images: torch.Tensor) -> "Reference":
        return cls(classifier, classify(classifier, images)[0])

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats, predicted = classify(self.classifier, images)
        precision, recall = precision_recall(self.features, feats)
        return {"fd": frechet_distance(self.features, feats), "precision": precision, "recall": recall,
                "accuracy": float((predicted == labels).double().mean())}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
