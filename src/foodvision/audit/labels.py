"""Likely label errors: a linear head trained k-fold on the frozen backbone's pooled features gives every
photo a predicted class distribution from a head that never saw it; cleanlab's ``find_label_issues``
(confident learning) flags the photos whose given label that distribution contradicts, ranked by cleanlab's
label-quality score (self-confidence: the out-of-fold probability of the given label; low = likely wrong).

The head is multinomial logistic regression (L2-regularised, full-batch L-BFGS) on standardised features
reduced by PCA to at most ``dims`` dimensions: seconds on a CPU for 25k photos, and deterministic.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per sample: each class's samples, in a seeded order, dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def reduce(features: np.ndarray, dims: int) -> torch.Tensor:
    """Standardised features projected on their top ``dims`` principal components, scaled to unit overall
    variance (unsupervised: uses no label, so nothing of a held-out fold's labels leaks into the others)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    q = min(dims, len(x) - 1)
    if x.shape[1] > q > 0:
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=q, center=False, niter=3)
        # Not whitened: the components keep their variance, so the noise of the smallest ones stays small
        # (whitened, a head on 120 photos fitted that noise and predicted held-out photos at chance).
        x = x @ v
    return x / x.std().clamp_min(1e-6)


def fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return head


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    folds: int = 5,
    seed: int = 0,
    dims: int = 256,
    l2: float = 1e-2,
    steps: int = 100,
) -> np.ndarray:
    """``[N, num_classes]`` predicted probabilities, each row from the head of the folds it was not in."""
    x = reduce(features, dims)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    fold = stratified_folds(np.asarray(labels), folds, seed)
    probabilities = np.zeros((len(labels), num_classes), dtype=np.float64)
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        train = torch.from_numpy(~held)
        head = fit_softmax(x[train], y[train], num_classes, l2, steps)
        with torch.no_grad():
            probabilities[held] = head(x[torch.from_numpy(held)]).softmax(1).double().numpy()
    return probabilities


def label_issues(
    probabilities: np.ndarray, labels: np.ndarray, filter_by: str = "prune_by_noise_rate"
) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged indices ranked most likely wrong first, label-quality score of every sample)`` by
    cleanlab."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    ranked = find_label_issues(
        labels, probabilities, filter_by=filter_by, return_indices_ranked_by="self_confidence"
    )
    return np.asarray(ranked, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def head_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """How often the out-of-fold head agrees with the given labels (how far its suggestions can be trusted)."""
    return float((probabilities.argmax(1) == np.asarray(labels)).mean()) if len(labels) else 0.0
