"""Toy set datasets with a known answer, for checking that a model learns.

* ``square_sets``: sets of 2-D points uniform in the square ``[-1, 1]^2``.
* ``square_ring_sets``: class-conditional: class ``k`` of ``K`` puts its points uniformly in the
  square ring ``k / K <= max(|x|, |y|) < (k + 1) / K``.

Set sizes vary between ``n_min`` and ``n_max`` so the padding mask is exercised.
"""

from __future__ import annotations

import numpy as np


def _set_sizes(rng: np.random.Generator, n_sets: int, n_max: int, n_min: int):
    sizes = rng.integers(n_min, n_max + 1, size=n_sets)
    return np.arange(n_max)[None, :] < sizes[:, None]


def square_sets(rng: np.random.Generator, n_sets: int, n_max: int = 16, n_min: int = 4) -> dict:
    """``{"x": [n_sets, n_max, 2], "mask": [n_sets, n_max]}`` with points uniform in ``[-1, 1]^2``."""
    mask = _set_sizes(rng, n_sets, n_max, n_min)
    x = rng.uniform(-1.0, 1.0, size=(n_sets, n_max, 2)) * mask[..., None]
    return {"x": x.astype(np.float32), "mask": mask}


def _uniform_in_ring(rng: np.random.Generator, inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """One point per (inner, outer) pair, uniform in the square ring ``inner <= max(|x|,|y|) < outer``,
    by rejection from the outer square."""
    inner, outer = inner.ravel(), outer.ravel()
    points = np.empty(inner.shape + (2,))
    todo = np.arange(inner.size)
    while todo.size:
        candidates = rng.uniform(-1.0, 1.0, size=(todo.size, 2)) * outer[todo, None]
        accepted = np.abs(candidates).max(axis=1) >= inner[todo]
        points[todo[accepted]] = candidates[accepted]
        todo = todo[~accepted]
    return points


def square_ring_sets(
    rng: np.random.Generator, n_sets: int, n_max: int = 16, n_min: int = 4, n_classes: int = 3
) -> dict:
    """Class-conditional square rings: ``{"x", "mask", "labels"}``; see the module docstring."""
    mask = _set_sizes(rng, n_sets, n_max, n_min)
    labels = rng.integers(0, n_classes, size=n_sets)
    per_point = np.broadcast_to(labels[:, None], mask.shape)
    x = _uniform_in_ring(rng, per_point / n_classes, (per_point + 1) / n_classes).reshape(mask.shape + (2,))
    x = x * mask[..., None]
    return {"x": x.astype(np.float32), "mask": mask, "labels": labels.astype(np.int32)}


def ring_index(points: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Which ring ``k`` each 2-D point lies in, or -1 outside the square ``[-1, 1]^2``."""
    radius = np.abs(points).max(axis=-1)
    return np.where(radius < 1.0, np.floor(radius * n_classes).astype(int), -1)
