"""The free-extent allocator against a plain set of free pages."""
import random

from pydedup.extents import Extents


def test_random_takes_and_gives_match_a_set_of_pages():
    rnd = random.Random(7)
    extents, free, taken = Extents(1000), set(range(1000)), []
    for _ in range(3000):
        if taken and rnd.random() < 0.45:
            start, n = taken.pop(rnd.randrange(len(taken)))
            extents.give(start, n)
            free.update(range(start, start + n))
        else:
            n = rnd.randint(1, 60)
            start = extents.take(n)
            if start is None:
                assert not any(set(range(s, s + n)) <= free for s in range(1000 - n + 1))
                continue
            run = set(range(start, start + n))
            assert run <= free
            free -= run
            taken.append((start, n))
        assert extents.free_pages == len(free)
        # coalesced: no two free extents touch
        runs = sorted(extents._by_start.items())
        assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))


def test_best_fit_prefers_the_smallest_hole():
    extents = Extents(100)
    a, _, c = extents.take(10), extents.take(3), extents.take(10)
    extents.give(a, 10)
    extents.give(c, 10)                          # holes: [0,10) and [13,100)
    assert extents.take(5) == 0
    assert extents.largest == 87
