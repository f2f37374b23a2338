"""Batching: collate, a resumable bucket loader around torch's DataLoader, and device prefetch.

    loader = build_dataloader(dataset, batch_size=4, seed=0, num_workers=2, device="cuda",
                              tokenize=TokenizeCaptions(bundle.tokenizers))   # optional token ids
    loader.load_state_dict(saved)                # optional resume
    for epoch in itertools.count(loader.epoch):
        loader.set_epoch(epoch)
        for batch in loader:                     # tensors already on the device
            ...
            state = loader.state_dict()          # {"epoch", "batch_index", ...} for checkpoints
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.utils.data

from .sampler import BucketBatchSampler

_STACKED = ("pixels", "latent_mean", "latent_std", "context", "pooled", "mask")


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # In a worker, stack straight into shared memory: the batch then crosses to the main
        # process without another copy (what torch's default_collate does too).
        first = values[0]
        storage = first.untyped_storage()._new_shared(len(values) * first.numel() * first.element_size())
        out = first.new_empty(0).set_(storage).view(len(values), *first.shape)
    return torch.stack(values, out=out)


class TokenizeCaptions:
    """Captions -> token ids for each tokenizer: a list of (B, 77) int64 CPU tensors.

    A picklable collate hook (`build_dataloader(tokenize=...)`): tokenizing in the DataLoader
    (its workers, when there are any) puts the ids into pinned memory and through the device
    prefetcher, instead of a blocking copy from pageable memory inside every training step.
    """

    def __init__(self, tokenizers: Iterable) -> None:
        self.tokenizers = list(tokenizers)

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        return [tok(list(captions)) for tok in self.tokenizers]


def collate_batch(samples: list[dict], tokenize: Callable[[list[str]], list[torch.Tensor]] | None = None) -> dict:
    """Stack tensors of same-bucket samples; keep captions, sizes and names as lists.

    Returns pixels (B, 3, H, W) and/or latent_mean/latent_std (B, C, h, w), context (B, T, D),
    pooled (B, P) (None when the encoder has none), caption list[str], original_size /
    crop_top_left / target_size list[(int, int)], add_time_ids float32 (B, 6) = SDXL's
    (orig_h, orig_w, top, left, target_h, target_w), index LongTensor (B,), name list[str], and
    `failed` list[(record, reason)] when a worker had to replace an undecodable image; is_reg bool
    (B,) (regularization images); mask (B, 1, H, W) or (B, 1, h, w) with loss masks on.
    With `tokenize`, also token_ids = tokenize(captions): one (B, 77) int64 tensor per tokenizer.
    """
    if not samples:
        raise ValueError("collate_batch: empty batch")
    batch: dict = {}
    for key in _STACKED:
        if key not in samples[0]:
            continue
        values = [s[key] for s in samples]
        if all(v is None for v in values):
            batch[key] = None
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"collate_batch: {key} shapes differ within a batch {sorted(shapes)}; "
                             "batches must come from one bucket (use BucketBatchSampler)")
        batch[key] = _stack(values)
    for key in ("caption", "original_size", "crop_top_left", "target_size", "name"):
        batch[key] = [s[key] for s in samples]
    failed = [f for s in samples for f in s.get("failed", ())]
    if failed:  # (record, reason) of images a worker could not decode; see BucketLoader.__iter__
        batch["failed"] = failed
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    batch["is_reg"] = torch.tensor([bool(s.get("is_reg", False)) for s in samples], dtype=torch.bool)
    batch["add_time_ids"] = torch.tensor(
        [[*s["original_size"], *s["crop_top_left"], *s["target_size"]] for s in samples], dtype=torch.float32)
    if tokenize is not None:
        batch["token_ids"] = list(tokenize(batch["caption"]))
    return batch


def move_to(batch, device: torch.device, non_blocking: bool = False):
    """`batch` with every tensor (in dicts/lists/tuples) moved to `device`; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to(v, device, non_blocking) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to(v, device, non_blocking) for v in batch)
    return batch


def _tensors(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


class DevicePrefetcher:
    """Iterates `loader` with each batch already on `device`.

    On CUDA the copy of batch i+1 is issued on a side stream while batch i is being used, so the
    host-to-device transfer overlaps compute (pinned host memory makes the copy asynchronous);
    the compute stream waits for the copy before a batch is handed out. Elsewhere it just moves.
    """

    def __init__(self, loader: Iterable, device: str | torch.device):
        self.loader = loader
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield move_to(batch, self.device)
            return
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def preload():
            try:
                batch = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return move_to(batch, self.device, non_blocking=True)

        nxt = preload()
        while nxt is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            batch = nxt
            for t in _tensors(batch):
                t.record_stream(current)  # memory allocated on the side stream is used on this one
            nxt = preload()
            yield batch


def _worker_init(_worker_id: int) -> None:
    # Decoding runs in several workers already; extra intra-op threads per worker only oversubscribe.
    torch.set_num_threads(1)


class BucketLoader:
    """DataLoader over a BucketBatchSampler that knows how many batches training consumed.

    `state_dict()` is exact even though workers prefetch: it counts batches handed to the loop.
    Iterating yields collated batches (on `device` through DevicePrefetcher when given).
    """

    def __init__(self, dataset, sampler: BucketBatchSampler, *, num_workers: int = 0, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None, prefetch_factor: int | None = None,
                 device: str | torch.device | None = None, multiprocessing_context=None,
                 tokenize: Callable[[list[str]], list[torch.Tensor]] | None = None):
        self.dataset, self.sampler = dataset, sampler
        self.device = torch.device(device) if device is not None else None
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        kwargs = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True if persistent_workers is None else persistent_workers,
                          prefetch_factor=prefetch_factor or 2, worker_init_fn=_worker_init,
                          multiprocessing_context=multiprocessing_context)
        collate = collate_batch if tokenize is None else functools.partial(collate_batch, tokenize=tokenize)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                                  collate_fn=collate, pin_memory=pin_memory, **kwargs)
        self._consumed = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (a position loaded for this epoch is kept)."""
        if epoch != self.sampler.epoch:
            self._consumed = 0
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        self._consumed = self.sampler.start_batch
        source = self.loader if self.device is None else DevicePrefetcher(self.loader, self.device)
        for batch in source:
            self._consumed += 1
            for record, reason in batch.pop("failed", ()):
                self.dataset.report_failure(record, reason)  # once per file, however many workers hit it
            yield batch

    def state_dict(self) -> dict:
        """{"epoch", "batch_index", ...}: resume point after the batches handed out so far."""
        return self.sampler.state_dict(batches_done=self._consumed)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.sampler.load_state_dict(state, strict=strict)
        self._consumed = self.sampler.start_batch


def build_dataloader(dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                     rank: int = 0, world_size: int = 1, uneven: str = "pad", num_workers: int | None = None,
                     pin_memory: bool | None = None, persistent_workers: bool | None = None,
                     prefetch_factor: int | None = None, device: str | torch.device | None = None,
                     multiprocessing_context=None,
                     tokenize: Callable[[list[str]], list[torch.Tensor]] | None = None) -> BucketLoader:
    """BucketLoader over `dataset` (an ImageCaptionDataset): same-bucket batches of `batch_size`.

    seed/shuffle/drop_last/rank/world_size/uneven: see BucketBatchSampler. num_workers defaults to
    the dataset's `config.num_workers` (0 when it has none). pin_memory defaults to
    True for CUDA devices; persistent_workers to True when num_workers > 0. device: move batches
    there (overlapped with compute on CUDA). tokenize: picklable captions -> token-id tensors hook
    (e.g. `TokenizeCaptions`) run at collate time; batches then carry `token_ids`.
    """
    if num_workers is None:
        num_workers = getattr(getattr(dataset, "config", None), "num_workers", 0)
    sampler = BucketBatchSampler(dataset.buckets, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                                 rank=rank, world_size=world_size, uneven=uneven,
                                 regularization=getattr(dataset, "regularization", None))
    return BucketLoader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, device=device,
                        multiprocessing_context=multiprocessing_context, tokenize=tokenize)
