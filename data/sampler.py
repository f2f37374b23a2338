"""Bucket batch sampler: same-bucket batches, deterministic per-epoch shuffle, resume, rank sharding.

Epoch plan (identical on every rank, a function of (seed, epoch) only):
1. within each bucket, sample indices are shuffled and cut into batches of `batch_size`; a bucket's
   last, smaller batch is kept (`drop_last=False`, default) or dropped (`drop_last=True`);
2. the batch order is shuffled across buckets;
3. for `world_size` > 1 the number of batches is made a multiple of world_size:
   `uneven="pad"` (default) repeats the first batches of the shuffled order (a few samples are seen
   twice per epoch), `uneven="drop"` drops the last batches (a few samples are skipped this epoch,
   different ones each epoch); rank r then takes batches r, r + W, r + 2W, ... so every rank runs
   the same number of steps (needed by DDP) and, without padding, ranks see disjoint samples.

Batches are lists of (index, epoch) pairs: the dataset derives crop/flip/caption randomness from
them, which also works with persistent DataLoader workers that never see `set_epoch`.

Regularization images (`regularization[i]` true): an epoch is the training samples plus as many
regularization samples, batched together by bucket (as kohya). The regularization samples of epoch
e are positions e*T .. e*T + T - 1 (T = training samples) of an endless sequence of seeded
permutations of the regularization set, so a large set is cycled through across epochs and a small
one repeats. The number of batches can then differ slightly between epochs (buckets fill differently).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch.utils.data

from .errors import DataError

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]  # (dataset index, epoch)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batch sampler over `buckets[i]` = bucket key of dataset index i (see module docstring).

    Resuming: `state_dict(batches_done)` / `load_state_dict(state)` store (epoch, batch index); the
    next iteration of that epoch starts at the stored batch. Use the count of batches the training
    loop consumed (DataLoader workers prefetch ahead of it); `BucketLoader` tracks that for you.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        uneven: str = "pad",
        regularization: Sequence[bool] | None = None,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size: must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if uneven not in ("pad", "drop"):
            raise DataError(f"uneven: must be 'pad' or 'drop', got {uneven!r}")
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.drop_last, self.rank, self.world_size, self.uneven = bool(drop_last), int(rank), int(world_size), uneven
        self.num_samples = len(buckets)
        reg = np.zeros(len(buckets), dtype=bool) if regularization is None else np.asarray(regularization, dtype=bool)
        if len(reg) != len(buckets):
            raise DataError(f"regularization: {len(reg)} flags for {len(buckets)} samples")
        keys: dict[Hashable, int] = {}
        for key in buckets:  # insertion order of first appearance: deterministic for a given dataset
            keys.setdefault(key, len(keys))
        self._bucket = np.asarray([keys[k] for k in buckets], dtype=np.int64)
        self._groups = [np.flatnonzero((self._bucket == g) & ~reg) for g in range(len(keys))]
        self._reg_pool = np.flatnonzero(reg)
        self.num_train_samples = int((~reg).sum())
        if len(self._reg_pool) and not self.num_train_samples:
            raise DataError("every sample is a regularization image; add training images")
        digest = hashlib.blake2b(digest_size=8)
        for g in self._groups:
            digest.update(g.tobytes())
            digest.update(b"|")
        digest.update(self._reg_pool.tobytes())
        self._fingerprint = digest.hexdigest()
        self._plans: dict[int, list[list[int]]] = {}
        self.epoch = 0
        self._start = 0
        self._yielded = 0
        total = self._total_batches(0)
        if total == 0:
            raise DataError(
                f"no batches: {self.num_samples} samples with batch_size={batch_size} and drop_last=True leave "
                "no full batch in any bucket; lower batch_size, add images/repeats or set drop_last=False")
        if uneven == "drop" and total < world_size:
            raise DataError(f"only {total} batches per epoch for world_size={world_size}; use uneven='pad' or fewer processes")

    # -- plan ---------------------------------------------------------------------------------------
    def _regularization(self, epoch: int) -> np.ndarray:
        """Regularization sample indices of `epoch` (see module docstring), in draw order."""
        pool, n = self._reg_pool, self.num_train_samples
        positions = np.arange(epoch * n, (epoch + 1) * n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        for cycle in np.unique(positions // len(pool)):
            perm = np.random.default_rng([self.seed % 2**64, int(cycle), 0x6E9]).permutation(pool)
            here = positions // len(pool) == cycle
            out[here] = perm[positions[here] % len(pool)]
        return out

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        """Per bucket, the sample indices of `epoch`: the training samples, then its regularization draws."""
        if not len(self._reg_pool):
            return self._groups
        reg = np.sort(self._regularization(epoch))
        return [np.concatenate([g, reg[self._bucket[reg] == b]]) for b, g in enumerate(self._groups)]

    def _total_batches(self, epoch: int) -> int:
        bs = self.batch_size
        return sum(len(g) // bs if self.drop_last else -(-len(g) // bs) for g in self._epoch_groups(epoch))

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        return self.epoch_length(self.epoch)

    def epoch_length(self, epoch: int) -> int:
        """Batches this rank gets in `epoch` (the same every epoch without regularization images)."""
        total, w = self._total_batches(epoch), self.world_size
        return -(-total // w) if self.uneven == "pad" else total // w

    @property
    def batches_per_epoch(self) -> int:
        return len(self)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of dataset indices) of `epoch`, in order."""
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(epoch)}  # the current epoch's plan only
        return self._plans[epoch]

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed % 2**64, epoch, 0x5A17])
        batches: list[np.ndarray] = []
        for g in self._epoch_groups(epoch):
            idx = rng.permutation(g) if self.shuffle else g
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        w = self.world_size
        if len(batches) % w:
            if self.uneven == "pad":
                need = w - len(batches) % w
                batches = batches + [batches[i % len(batches)] for i in range(need)]
            else:
                batches = batches[: len(batches) - len(batches) % w]
        return [b.tolist() for b in batches[self.rank::w]]

    # -- iteration / resume -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a resume position loaded for another epoch is discarded."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    @property
    def start_batch(self) -> int:
        """Batch index the next iteration starts at (non-zero only right after a resume)."""
        return self._start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, start = self.epoch, self._start
        self._start = 0
        plan = self.epoch_batches(epoch)
        for i in range(start, len(plan)):
            self._yielded = i + 1
            yield [(j, epoch) for j in plan[i]]

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position to resume from: {"epoch", "batch_index", ...}; batch_index = batches consumed.

        batches_done defaults to the number of batches yielded so far this epoch (which runs ahead
        of training when a DataLoader prefetches). A finished epoch is stored as the next epoch's start.
        """
        done = self._yielded if batches_done is None else int(batches_done)
        epoch = self.epoch
        if done >= len(self):
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batch_index": done, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_samples": self.num_samples, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at state["epoch"], batch state["batch_index"].

        strict: raise DataError when the saved position belongs to different data or batching
        (another dataset, batch size, world size or seed); non-strict restarts that epoch at batch 0.
        """
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        mismatches = [
            f"{k} {state.get(k)!r} -> {v!r}"
            for k, v in (("num_samples", self.num_samples), ("batch_size", self.batch_size),
                         ("world_size", self.world_size), ("seed", self.seed), ("fingerprint", self._fingerprint))
            if k in state and state[k] != v
        ]
        if mismatches:
            msg = ("cannot resume the data position: the data or batching changed since it was saved ("
                   + "; ".join(mismatches) + ")")
            if strict:
                raise DataError(msg + "; restore the original data/settings or resume with strict=False to restart the epoch")
            log.warning("%s; restarting epoch %d from its first batch", msg, epoch)
            index = 0
        if not 0 <= index <= self.epoch_length(epoch):
            raise DataError(f"cannot resume at batch {index}: epoch has only {self.epoch_length(epoch)} batches on "
                            "this rank")
        self.epoch, self._start, self._yielded = epoch, index, index
