"""Per-sample random generators keyed by (seed, epoch, index).

Every random choice is drawn on the host from an explicit ``numpy.random.Generator``. A
sample's generator depends only on (seed, epoch, sample index), never on which worker
draws it or in what order, so a batch is identical whatever the number of workers.
"""

from __future__ import annotations

import numpy as np


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch`` for a run seeded with ``seed``."""
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(epoch), int(index)))
    return np.random.Generator(np.random.PCG64(ss))


def batch_rngs(seed: int, epoch: int, indices: range | list[int]) -> list[np.random.Generator]:
    """One generator per sample index."""
    return [sample_rng(seed, epoch, i) for i in indices]
