"""The slot log against the naive merge it replaces: every harvest ORed into every consumer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylogd.service.slotlog import MAX_ENTRIES, SlotLog
from kvmshim.bitmap import DirtyBitmap

NPAGES = 200
# (op, consumer, seed): harvest (random bits), read (fold into pending, take it), join, leave,
# fold-all (the bound reached).
steps = st.lists(
    st.tuples(
        st.sampled_from(["harvest", "harvest", "read", "join", "leave", "fold_all"]),
        st.integers(0, 5),
        st.integers(0, 2**32 - 1),
    ),
    max_size=120,
)


def random_bits(seed):
    rng = np.random.default_rng(seed)
    return DirtyBitmap.from_pages(NPAGES, rng.choice(NPAGES, size=int(rng.integers(0, 8))))


@settings(max_examples=300, deadline=None)
@given(steps)
def test_each_consumer_folds_exactly_the_harvests_after_its_position(ops):
    log = SlotLog(NPAGES)
    naive: dict[int, DirtyBitmap] = {}  # what the old merge would have pending
    mine: dict[int, tuple[DirtyBitmap, int]] = {}  # (pending, position) through the log
    for op, who, seed in ops:
        if op == "harvest":
            bits = random_bits(seed)
            for pending in naive.values():
                pending |= bits
            log.append(bits.copy())
        elif op == "join" and who not in mine:
            naive[who] = DirtyBitmap(NPAGES)
            mine[who] = (DirtyBitmap(NPAGES), log.join())
        elif op == "leave" and who in mine:
            log.leave(mine.pop(who)[1])
            del naive[who]
        elif op == "read" and who in mine:
            pending, position = mine[who]
            position = log.fold(pending, position)
            assert pending == naive[who]
            mine[who] = (DirtyBitmap(NPAGES), position)  # taken: both start afresh
            naive[who] = DirtyBitmap(NPAGES)
        elif op == "fold_all":
            log.fold_all(mine.values())
            mine = {w: (p, log.head) for w, (p, _) in mine.items()}
        lagging = {pos for _, pos in mine.values() if pos < log.head}
        assert len(log) <= len(lagging)  # one bitmap per distinct position behind the head
    for who, (pending, position) in mine.items():
        log.fold(pending, position)
        assert pending == naive[who]


def test_a_harvest_costs_one_or_whatever_the_number_of_consumers():
    """64 consumers that never read: the log keeps one entry, extended in place."""
    log = SlotLog(NPAGES)
    positions = [log.join() for _ in range(64)]
    for seed in range(3 * MAX_ENTRIES):
        log.append(random_bits(seed))
    assert len(log) == 1
    union = DirtyBitmap(NPAGES)
    for seed in range(3 * MAX_ENTRIES):
        union |= random_bits(seed)
    pending = DirtyBitmap(NPAGES)
    log.fold(pending, positions[0])
    assert pending == union
