"""Free runs of arena pages. Best fit, the lowest address among equal fits,
neighbours coalesced on return: big arrays keep finding room, and pages in
use stay low in the reservation, where the scanner looks."""
from sortedcontainers import SortedDict, SortedList


class Extents:
    def __init__(self, npages: int):
        self._by_start = SortedDict({0: npages})     # start -> length
        self._by_length = SortedList([(npages, 0)])  # (length, start)
        self.free_pages = npages

    def take(self, n: int):
        """The first page of n consecutive free pages, or None."""
        i = self._by_length.bisect_left((n, -1))
        if i == len(self._by_length):
            return None
        length, start = self._by_length.pop(i)
        del self._by_start[start]
        if length > n:
            self._add(start + n, length - n)
        self.free_pages -= n
        return start

    def take_aligned(self, n: int, align: int):
        """Like take, starting on a multiple of `align` pages (a huge page's
        boundary): the smallest free run that holds such a start, else None."""
        i = self._by_length.bisect_left((n, -1))
        for length, start in self._by_length.islice(i):
            first = -(-start // align) * align
            if first + n <= start + length:
                self.take_at(first, n)
                return first
        return None

    def take_at(self, start: int, n: int) -> bool:
        """Take pages [start, start + n) if they are all free."""
        i = self._by_start.bisect_right(start) - 1
        if i < 0 or n <= 0:
            return False
        run, length = self._by_start.peekitem(i)
        if run + length < start + n:
            return False
        self._remove(run, length)
        if run < start:
            self._add(run, start - run)
        if start + n < run + length:
            self._add(start + n, run + length - start - n)
        self.free_pages -= n
        return True

    def give(self, start: int, n: int):
        self.free_pages += n
        i = self._by_start.bisect_left(start)
        if i > 0:
            before, before_length = self._by_start.peekitem(i - 1)
            if before + before_length == start:
                self._remove(before, before_length)
                start, n = before, before_length + n
        after_length = self._by_start.get(start + n)
        if after_length is not None:
            self._remove(start + n, after_length)
            n += after_length
        self._add(start, n)

    def runs(self):
        """The free runs, (start, length), by address."""
        return self._by_start.items()

    @property
    def largest(self) -> int:
        return self._by_length[-1][0] if self._by_length else 0

    def _add(self, start, n):
        self._by_start[start] = n
        self._by_length.add((n, start))

    def _remove(self, start, n):
        del self._by_start[start]
        self._by_length.remove((n, start))
