"""Training that a stopped run resumes exactly: a shuffled loader that remembers its place, and the
random state carried in the checkpoint.

Lightning saves a train loader's `state_dict()` in its checkpoints and hands it back on resume; a
plain shuffled `DataLoader` has none, so a resumed run used to read its epoch again from a new
shuffle. `ResumableDataLoader` records the shuffle's seed and how many batches of the epoch it has
served, and after `load_state_dict` goes on with the same shuffle from the next batch.
`ResumeRandomState` (a callback) saves torch's, NumPy's and Python's random state with every
checkpoint and sets it back when training restarts, so what is drawn after the stop (the next
epoch's shuffle, dropout, stage 2's negatives) is what the uninterrupted run drew.

Each pass draws its seed from torch's global generator as `RandomSampler` does, so a run that never
stops reads the rows in the order it always did. Under DDP, Lightning swaps the sampler for a
`DistributedSampler` (seeded, set per epoch) and the skip of served batches still applies; each
rank's random state is its own and is not restored.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler


class SeedRecordingSampler(RandomSampler):
    """`RandomSampler`'s shuffles, each pass's seed kept so that a resumed run can draw it again."""

    def __init__(self, data_source) -> None:
        super().__init__(data_source)
        self.seed: int | None = None  # the seed of the pass under way
        self.replay: int | None = None  # a seed to use instead of drawing one, once

    def __iter__(self) -> Iterator[int]:
        if self.replay is not None:
            self.seed, self.replay = self.replay, None
        else:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())  # what RandomSampler draws
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose state is the seed of its epoch's shuffle and the batches served so far."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        self._skip = 0
        self.resumes_mid_pass = False

    def __iter__(self) -> Iterator:
        # Built now, as DataLoader does (it draws its workers' base seed here, before the epoch-start hooks
        # draw theirs), so a run that never stops draws what it always drew. Lightning may build it before
        # a resumed run's state is handed over: the place to start from is read at the first batch.
        return self._serve(super().__iter__())

    def _serve(self, batches: Iterator) -> Iterator:
        skip, self._skip, self.served = self._skip, 0, 0
        for index, batch in enumerate(batches):
            self.served = index + 1
            if index >= skip:  # the batches before were trained on before the stop; their rows are only read
                yield batch

    def state_dict(self) -> dict:
        seed = self.sampler.seed if isinstance(self.sampler, SeedRecordingSampler) else None  # a DistributedSampler's is set per epoch
        return {"served": self.served, "seed": seed}

    def load_state_dict(self, state: dict) -> None:
        self.resumes_mid_pass = state["served"] < len(self)  # else stopped on a pass's last batch: the next draws a new shuffle
        if not self.resumes_mid_pass:
            return
        self._skip = state["served"]
        if isinstance(self.sampler, SeedRecordingSampler):
            self.sampler.replay = state["seed"]


def shuffled_loader(rows, **kwargs) -> ResumableDataLoader:
    """What `DataLoader(rows, shuffle=True, **kwargs)` reads, resumable."""
    return ResumableDataLoader(rows, sampler=SeedRecordingSampler(rows), **kwargs)


def random_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)  # tensors and plain values load with weights_only
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeRandomState(L.Callback):
    """Carries the random state and the train loaders' places across a stop (single process)."""

    def __init__(self) -> None:
        self.saved: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["random_state"] = random_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved = checkpoint.get("random_state")

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning #20550: a module whose configure_optimizers reads estimated_stepping_batches has its
        # train loader set up before the checkpoint is restored, and Lightning never hands the loader its
        # saved place. Hand it over here, before the first batch is drawn (a no-op once Lightning has).
        trainer.fit_loop._load_combined_loader_states()
        if self.saved is not None and trainer.world_size == 1:
            set_random_state(self.saved)  # as it was at the checkpoint; the sanity check's draws do not count
            for loader in trainer.fit_loop._combined_loader.flattened:
                if isinstance(loader, ResumableDataLoader) and not loader.resumes_mid_pass:
                    # Its iterator, built before this restore, drew its workers' base seed from the state it
                    # replaced; the uninterrupted run drew it from this one as the new pass began.
                    torch.empty((), dtype=torch.int64).random_()
        self.saved = None
