"""A shuffled training loader that a run stopped mid-epoch resumes exactly.

Lightning saves a train loader's `state_dict()` in its checkpoints and hands it back on resume; a
plain shuffled `DataLoader` has none, so a resumed run used to read its epoch again from a new
shuffle. This one records the shuffle's seed and how many batches of the epoch it has served, and
after `load_state_dict` goes on with the same shuffle from the next batch.

The epoch-0 shuffle is the one `RandomSampler` draws (one seed from torch's global generator), so an
uninterrupted run reads the rows in the order it always did. Later epochs use seed + epoch, which a
resumed run can recompute. Under DDP, Lightning swaps the sampler for a `DistributedSampler` (seeded,
set per epoch) and the skip of served batches still applies.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochSeededSampler(RandomSampler):
    """`RandomSampler`'s epoch-0 order; epoch e shuffles with seed + e, the seed drawn once."""

    def __init__(self, data_source) -> None:
        super().__init__(data_source)
        self.seed: int | None = None
        self.epoch = -1  # the epoch of the last pass started

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())  # what RandomSampler draws
        self.epoch += 1
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose state is the sampler's seed and epoch, and the batches served this epoch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        self._skip = 0

    def __iter__(self) -> Iterator:
        skip, self._skip, self.served = self._skip, 0, 0
        for index, batch in enumerate(super().__iter__()):
            self.served = index + 1
            if index >= skip:  # the batches before were trained on before the stop; their rows are only read
                yield batch

    def state_dict(self) -> dict:
        if isinstance(self.sampler, EpochSeededSampler):
            return {"served": self.served, "seed": self.sampler.seed, "epoch": self.sampler.epoch}
        return {"served": self.served, "seed": None, "epoch": None}  # a DistributedSampler is set per epoch by Lightning

    def load_state_dict(self, state: dict) -> None:
        finished = state["served"] >= len(self)  # stopped on an epoch's last batch: the next pass is a new epoch
        self._skip = 0 if finished else state["served"]
        if isinstance(self.sampler, EpochSeededSampler) and state.get("seed") is not None:
            self.sampler.seed = state["seed"]
            self.sampler.epoch = state["epoch"] - (0 if finished else 1)  # __iter__ steps it on
