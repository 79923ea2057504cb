"""After fork, parent and child keep every value, whichever of them merges,
unmerges, frees or exits first; a child merges into a memfd of its own."""
import gc
import os
import resource
import traceback

import numpy as np

from pydedup import testing

from kernel import PAGE, frame_mappings

PAGE_FLOATS = PAGE // 8
MAX_TIERS = 8                   # memfds a frame store can have (_fast.pxd)


def run_in_child(check):
    """Run check() in a forked child; its exit status tells the parent."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            traceback.print_exc()
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Child:
    """A forked child running body(child) while the parent goes on, the two
    taking turns through a pipe each way: say() passes the turn, hear() waits
    for it (False if the other process closed its end: it failed or ended).
    As a context manager it waits for the child on leaving; exit_code is then
    0 if body returned true."""

    def __init__(self, body):
        to_child, to_parent = os.pipe(), os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(to_child[1])
            os.close(to_parent[0])
            self._hear_fd, self._say_fd = to_child[0], to_parent[1]
            status = 2
            try:
                status = 0 if body(self) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(to_child[0])
        os.close(to_parent[1])
        self._hear_fd, self._say_fd = to_parent[0], to_child[1]
        self.exit_code = None

    def say(self):
        os.write(self._say_fd, b"x")

    def hear(self):
        return os.read(self._hear_fd, 1) == b"x"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self._say_fd)          # a child still waiting hears the end
        os.close(self._hear_fd)
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)


def core_of(arena):
    return testing.core(arena)


def inode(fd):
    return os.fstat(fd).st_ino


def first_memfd(core):
    """The inode of the memfd of the top tier's first stripe: it holds
    every frame these tests make (fewer than STRIPE_PAGES, 1,024)."""
    return inode(core.memfds[0])


def pair(arena, seed, npages):
    """An array of random content, a copy, and the content: distinct seeds
    give content no other process makes."""
    content = np.random.default_rng(seed).random(npages * PAGE_FLOATS)
    return arena.array(content), arena.array(content), content


def mapped_stores(array):
    """The inodes of the frame-store memfds the pages of `array` map (None
    for a page that maps none)."""
    return {m[0] if m else None for m in frame_mappings(array)}


def test_the_parent_freeing_frames_leaves_the_child_its_data(arena, rng):
    a = arena.array(rng.random(64 * PAGE_FLOATS))
    b = arena.array(a)
    expected = a.copy()
    arena.merge()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # child: wait for the parent to free, then check
        os.read(r, 1)
        os._exit(0 if np.array_equal(b, expected) else 1)
    del a
    arena.unmerge()                              # the parent drops every frame it had
    gc.collect()
    assert arena.stats().frames_in_use == 0
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(b, expected)


def test_the_child_freeing_and_writing_leaves_the_parent_its_data(arena, rng):
    a = arena.array(rng.random(64 * PAGE_FLOATS))
    b = arena.array(a)
    expected = a.copy()
    arena.merge()

    def child():
        b[:] = -1.0
        arena.unmerge()
        return (b == -1.0).all() and np.array_equal(a, expected)

    assert run_in_child(child) == 0
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    assert arena.merge().skipped["no_memory"] == 0
    np.testing.assert_array_equal(b, expected)


def test_a_forked_child_without_a_memfd_of_its_own_refuses_to_merge_and_the_parent_goes_on(arena, rng):
    a = arena.array(rng.random(8 * PAGE_FLOATS))
    arena.merge()

    def middle():
        # No file descriptor to spare at the fork: the grandchild cannot make its memfd.
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (0, limits[1]))

        def child():
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            b = arena.array(a)
            try:
                arena.merge()
            except RuntimeError as e:
                arena.unmerge()
                del b
                gc.collect()
                return "forked" in str(e) and "memfd" in str(e)
            return False

        code = run_in_child(child)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        return code == 0

    assert run_in_child(middle) == 0
    b = arena.array(a)
    assert arena.merge().pages_merged == 16
    np.testing.assert_array_equal(a, b)


def test_a_forked_child_merges_into_a_memfd_of_its_own(arena):
    a, b, content = pair(arena, 1, 16)
    assert arena.merge().pages_merged == 32
    parent_store = first_memfd(core_of(arena))
    parent_bytes = arena.stats().frame_store_bytes
    assert mapped_stores(b) == {parent_store}

    def child():
        core = core_of(arena)
        c, d, child_content = pair(arena, 2, 8)
        report = arena.merge()
        own = first_memfd(core)
        fence = core.fork_fence
        return (report.pages_merged == 16 and report.frames_new == 8
                and own != parent_store and len(core.frame_store_tiers) == 2
                and mapped_stores(c) == mapped_stores(d) == {own}
                and all(m[1] >= fence * PAGE for m in frame_mappings(c))
                and mapped_stores(b) == {parent_store}
                and arena.stats().frame_store_bytes == 8 * PAGE    # its own frames only
                and np.array_equal(c, child_content) and np.array_equal(d, child_content)
                and np.array_equal(a, content) and np.array_equal(b, content))

    assert run_in_child(child) == 0
    assert arena.stats().frame_store_bytes == parent_bytes      # the child wrote nothing to it
    np.testing.assert_array_equal(a, content)
    np.testing.assert_array_equal(b, content)


def test_parent_and_child_merging_freeing_and_unmerging_in_turns_keep_their_values(arena):
    # Both write new frames from the fence up, the same frame numbers: each
    # reads its merged pages for the first time only after the other wrote,
    # freed and punched its own frames of those numbers.
    a, a2, shared = pair(arena, 1, 8)
    arena.merge()

    def child(parent):
        c, c2, mine = pair(arena, 2, 8)
        assert arena.merge().frames_new == 8
        parent.say()                                 # 1: merged, pages not read yet
        assert parent.hear()                         # 2: the parent merged its own
        assert np.array_equal(c, mine) and np.array_equal(c2, mine)
        arena.unmergeable(c)
        del c, c2
        gc.collect()                                 # frees and punches the child's frames
        assert core_of(arena).frames_in_use == 8     # the fenced ones, still mapped by a, a2
        g, g2, later = pair(arena, 3, 8)
        assert arena.merge().frames_new == 8         # same frame numbers again
        parent.say()                                 # 3
        assert parent.hear()                         # 4: the parent freed its frames
        return (np.array_equal(g, later) and np.array_equal(g2, later)
                and np.array_equal(a, shared) and np.array_equal(a2, shared))

    with Child(child) as kid:
        assert kid.hear()                            # 1
        e, e2, mine = pair(arena, 4, 8)
        assert arena.merge().frames_new == 8
        assert mapped_stores(e) == {first_memfd(core_of(arena))}
        kid.say()                                    # 2
        assert kid.hear()                            # 3: the child freed and merged again
        np.testing.assert_array_equal(e, mine)
        np.testing.assert_array_equal(e2, mine)
        del e
        arena.unmerge()
        gc.collect()
        kid.say()                                    # 4
    assert kid.exit_code == 0
    np.testing.assert_array_equal(e2, mine)
    np.testing.assert_array_equal(a, shared)
    np.testing.assert_array_equal(a2, shared)


def test_a_run_of_frames_across_the_fence_maps_each_from_its_memfd(arena):
    a, b, content = pair(arena, 1, 4)
    arena.merge()                                    # frames 0-3, in the parent's memfd

    def child():
        core = core_of(arena)
        # Page 0 matches the last fenced frame; pages 1-2 get the next new
        # frames, the first ones above the fence, in the child's memfd.
        mixed = np.concatenate([content[-PAGE_FLOATS:], np.random.default_rng(2).random(2 * PAGE_FLOATS)])
        c, d = arena.array(mixed), arena.array(mixed)
        arena.merge()
        maps = frame_mappings(c)
        parent_store = inode(core.frame_store_tiers[0][1][0])
        own = first_memfd(core)
        if maps != [(parent_store, 3 * PAGE), (own, 4 * PAGE), (own, 5 * PAGE)]:
            print("not the run this test is about:", maps, core.fork_fence)
            return False
        return (np.array_equal(c, mixed) and np.array_equal(d, mixed)
                and frame_mappings(d) == maps and np.array_equal(b, content))

    assert run_in_child(child) == 0
    np.testing.assert_array_equal(a, content)
    np.testing.assert_array_equal(b, content)


def test_a_grandchild_merges_and_its_parent_and_grandparent_keep_their_values(arena):
    a, a2, first = pair(arena, 1, 8)
    arena.merge()

    def child():
        c, c2, second = pair(arena, 2, 8)
        arena.merge()

        def grandchild(parent):
            core = core_of(arena)
            g, g2, third = pair(arena, 3, 8)
            assert arena.merge().frames_new == 8
            assert len(core.frame_store_tiers) == 3
            assert mapped_stores(g) == {first_memfd(core)}
            parent.say()                             # 1
            assert parent.hear()                     # 2: the child merged frames of the same numbers
            ok = (np.array_equal(g, third) and np.array_equal(g2, third)
                  and np.array_equal(c, second) and np.array_equal(a2, first))
            del g
            arena.unmerge()
            gc.collect()
            return ok and np.array_equal(g2, third)

        with Child(grandchild) as kid:
            assert kid.hear()                        # 1
            h, h2, fourth = pair(arena, 4, 8)
            assert arena.merge().frames_new == 8
            kid.say()                                # 2
        assert kid.exit_code == 0
        return (len(core_of(arena).frame_store_tiers) == 2
                and np.array_equal(h, fourth) and np.array_equal(h2, fourth)
                and np.array_equal(c, second) and np.array_equal(c2, second)
                and np.array_equal(a, first) and np.array_equal(a2, first))

    assert run_in_child(child) == 0
    np.testing.assert_array_equal(a, first)
    np.testing.assert_array_equal(a2, first)


def test_generations_that_merge_each_add_a_memfd_up_to_the_limit(arena):
    # Generation k (0: this process) merges its own pair, then forks k + 1;
    # each checks every older generation's values. Generation MAX_TIERS would
    # need a memfd more than a frame store can have: it cannot merge.
    arrays = []

    def generation(k):
        core = core_of(arena)
        if k > 0 and len(core.frame_store_tiers) != min(k + 1, MAX_TIERS):
            return False
        x, y, content = pair(arena, k, 2)
        try:
            merged = arena.merge().pages_merged
        except RuntimeError as e:
            return k == MAX_TIERS and "memfds" in str(e) and all(
                np.array_equal(x, c) and np.array_equal(y, c) for x, y, c in arrays)
        arrays.append((x, y, content))
        if merged != 4 or k == MAX_TIERS:
            return False
        return run_in_child(lambda: generation(k + 1)) == 0 and all(
            np.array_equal(x, c) and np.array_equal(y, c) for x, y, c in arrays)

    assert generation(0)


def test_a_child_forked_with_no_frame_above_its_fence_replaces_the_memfd_it_would_not_use(arena):
    # Forked before any merge: the parent's memfd holds no frame the child
    # needs; so for a grandchild forked before the child merged.
    parent_store = first_memfd(core_of(arena))

    def child():
        core = core_of(arena)
        if len(core.frame_store_tiers) != 1 or first_memfd(core) == parent_store:
            return False

        def grandchild():
            own = first_memfd(core)
            c, d, more = pair(arena, 2, 4)
            return (len(core.frame_store_tiers) == 1 and own not in (parent_store, child_store)
                    and arena.merge().pages_merged == 16 and mapped_stores(c) == {own}
                    and mapped_stores(a) == {own} and np.array_equal(b, content)
                    and np.array_equal(c, more) and np.array_equal(d, more))

        child_store = first_memfd(core)
        a, b, content = pair(arena, 1, 4)
        return (run_in_child(grandchild) == 0 and arena.merge().pages_merged == 8
                and mapped_stores(a) == {child_store} and np.array_equal(b, content))

    assert run_in_child(child) == 0
    assert arena.stats().frame_store_bytes == 0
