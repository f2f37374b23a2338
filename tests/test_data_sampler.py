"""Bucket batch sampler: bucket purity, determinism, drop_last, resume position, rank sharding."""
import pytest

from data.errors import DataError
from data.sampler import BucketBatchSampler

# 3 buckets with 10, 7 and 5 samples, interleaved in index order
BUCKETS = [i % 3 for i in range(15)] + [0] * 5 + [1] * 2


def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return [[i for i, _ in batch] for batch in sampler]


def test_batches_are_bucket_pure_and_cover_the_epoch():
    s = BucketBatchSampler(BUCKETS, 3, seed=1)
    batches = _epoch(s)
    assert len(batches) == len(s) == 4 + 3 + 2
    for b in batches:
        assert len({BUCKETS[i] for i in b}) == 1
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(BUCKETS)))
    keys = next(iter(s))
    assert all(isinstance(k, tuple) and k[1] == 0 for k in keys)  # (index, epoch) keys


def test_shuffle_is_deterministic_per_seed_and_epoch():
    a, b = BucketBatchSampler(BUCKETS, 3, seed=1), BucketBatchSampler(BUCKETS, 3, seed=1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1) != _epoch(a, 0)
    assert _epoch(BucketBatchSampler(BUCKETS, 3, seed=2), 0) != _epoch(a, 0)
    assert _epoch(BucketBatchSampler(BUCKETS, 3, shuffle=False), 0)[0] == [0, 3, 6]


def test_drop_last_drops_partial_batches():
    s = BucketBatchSampler(BUCKETS, 3, drop_last=True)
    batches = _epoch(s)
    assert len(batches) == 3 + 2 + 1 and all(len(b) == 3 for b in batches)
    with pytest.raises(DataError, match="no batches"):
        BucketBatchSampler([0, 1, 2], 2, drop_last=True)


def test_resume_inside_an_epoch():
    full = _epoch(BucketBatchSampler(BUCKETS, 2, seed=5), 3)
    s = BucketBatchSampler(BUCKETS, 2, seed=5)
    s.set_epoch(3)
    it = iter(s)
    head = [[i for i, _ in next(it)] for _ in range(4)]
    state = s.state_dict()
    assert state["epoch"] == 3 and state["batch_index"] == 4
    resumed = BucketBatchSampler(BUCKETS, 2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the training loop re-selects the saved epoch: position kept
    tail = [[i for i, _ in b] for b in resumed]
    assert head + tail == full
    assert _epoch(resumed, 4) == _epoch(BucketBatchSampler(BUCKETS, 2, seed=5), 4)  # next epoch from start
    end = resumed.state_dict(batches_done=len(resumed))
    assert (end["epoch"], end["batch_index"]) == (5, 0)


def test_resume_refuses_changed_data():
    state = BucketBatchSampler(BUCKETS, 2).state_dict(batches_done=3)
    with pytest.raises(DataError, match="changed"):
        BucketBatchSampler(BUCKETS[:-1], 2).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size"):
        BucketBatchSampler(BUCKETS, 4).load_state_dict(state)
    lenient = BucketBatchSampler(BUCKETS, 4)
    lenient.load_state_dict(state, strict=False)
    assert lenient.start_batch == 0


def test_two_ranks_disjoint_and_complete():
    buckets = [0] * 8 + [1] * 4  # 4 + 2 batches of 2: divisible by 2 ranks, no padding
    ranks = [BucketBatchSampler(buckets, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [[i for b in _epoch(s, 1) for i in b] for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


@pytest.mark.parametrize("uneven", ["pad", "drop"])
def test_uneven_batches_equal_steps_per_rank(uneven):
    ranks = [BucketBatchSampler(BUCKETS, 3, seed=0, rank=r, world_size=2, uneven=uneven) for r in range(2)]
    per_rank = [_epoch(s, 2) for s in ranks]  # 9 batches in total
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == (5 if uneven == "pad" else 4)
    seen = [i for batches in per_rank for b in batches for i in b]
    if uneven == "pad":
        assert set(seen) == set(range(len(BUCKETS)))  # complete; one batch is seen twice
    else:
        assert len(seen) == len(set(seen))  # disjoint; one batch skipped this epoch
