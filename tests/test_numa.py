"""NUMA: the topology, merge_across_nodes, frames per node, pages that move,
placement of arrays. The per-node logic runs on simulated nodes (a map page
-> node standing in for the kernel); the kernel paths run for real on this
machine's node 0."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pydedup
from pydedup import numa, testing

from kernel import PAGE, address, frame_offsets

PAGE_FLOATS = PAGE // 8


@pytest.fixture
def two_nodes(arena):
    """The arena on two simulated nodes: (arena, map page -> node)."""
    return arena, testing.simulate_numa(arena, 2)


def pages_of(arena, array):
    """The entries of the node map that belong to `array`."""
    first = (address(array) - testing.address_range(arena)[0]) // PAGE
    return slice(first, first + -(-array.nbytes // PAGE))


# -- the topology -----------------------------------------------------------------

def test_this_machine_has_node_0_with_the_cpus_this_process_may_use():
    topology = numa.topology()
    assert 0 in topology.node_ids
    all_cpus = {cpu for node in topology.nodes for cpu in node.cpus}
    assert set(os.sched_getaffinity(0)) <= all_cpus
    assert sum(node.memory_bytes for node in topology.nodes) > 0
    assert pydedup.features()["numa_nodes"] == len(topology.nodes)


def test_a_two_node_sysfs_is_read_node_by_node(tmp_path):
    for node, cpus, kib in ((0, "0-3,8", 1024), (1, "4-7", 0)):
        directory = tmp_path / f"node{node}"
        directory.mkdir()
        (directory / "cpulist").write_text(cpus + "\n")
        (directory / "meminfo").write_text(f"Node {node} MemTotal:       {kib} kB\n")
    (tmp_path / "possible").write_text("0-1\n")         # not a node
    topology = numa.topology(str(tmp_path))
    assert topology.from_kernel
    assert topology.nodes == (numa.Node(0, (0, 1, 2, 3, 8), 1 << 20), numa.Node(1, (4, 5, 6, 7), 0))
    assert topology.nodes_with_memory == (0,)
    assert topology.check("interleave") == (0,)


def test_a_kernel_without_numa_is_one_node_of_every_cpu(tmp_path):
    topology = numa.topology(str(tmp_path / "absent"))
    assert not topology.from_kernel
    assert topology.node_ids == (0,)
    assert topology.nodes[0].cpus == tuple(sorted(os.sched_getaffinity(0)))


@pytest.mark.parametrize("node, error", [
    (1 << 20, ValueError), (-1, ValueError), ("near", TypeError), (1.0, TypeError), (True, TypeError),
])
def test_a_bad_node_is_refused_and_nothing_is_allocated(arena, node, error):
    in_use = arena.stats().pages_in_use
    with pytest.raises(error, match="node"):
        arena.zeros(10, node=node)
    assert arena.stats().pages_in_use == in_use


# -- merge_across_nodes -------------------------------------------------------------

def test_across_nodes_pages_of_both_nodes_share_frames(two_nodes, rng):
    arena, _ = two_nodes
    a = arena.array(rng.random((32, PAGE_FLOATS)), node=0)
    b = arena.array(a, node=1)
    arena.merge()
    assert frame_offsets(a) == frame_offsets(b)
    assert arena.stats().frames_by_node == {0: 32}   # written for the first page found


def test_with_merge_across_nodes_off_each_node_has_its_own_frames(two_nodes, rng):
    arena, page_nodes = two_nodes
    arena.merge_across_nodes = False
    a0 = arena.array(rng.random((32, PAGE_FLOATS)), node=0)
    a1, b1 = arena.array(a0, node=1), arena.array(a0, node=1)
    b0 = arena.array(a0, node=0)
    report = arena.merge()
    assert report.pages_merged == 4 * 32
    assert frame_offsets(a0) == frame_offsets(b0)
    assert frame_offsets(a1) == frame_offsets(b1)
    assert not set(frame_offsets(a0)) & set(frame_offsets(a1))
    assert arena.stats().frames_by_node == {0: 32, 1: 32}
    assert (page_nodes[pages_of(arena, a1)] == 1).all()
    for array in (a1, b1, b0):
        np.testing.assert_array_equal(array, a0)


def test_the_knob_changes_only_while_nothing_is_merged(two_nodes, rng):
    arena, _ = two_nodes
    a = arena.array(rng.random((8, PAGE_FLOATS)))
    b = arena.array(a)
    arena.merge()
    with pytest.raises(RuntimeError, match=r"merge_across_nodes.*unmerge\(\) first"):
        arena.merge_across_nodes = False
    assert arena.merge_across_nodes is True
    assert arena.stats().pages_sharing == 8
    arena.unmerge()
    arena.merge_across_nodes = False
    assert arena.merge().pages_merged == 16
    np.testing.assert_array_equal(a, b)


def test_zero_pages_go_to_the_zero_page_on_every_node(two_nodes):
    arena, _ = two_nodes
    arena.merge_across_nodes = False
    zeros = [arena.zeros((4, PAGE_FLOATS), node=node) for node in (0, 1)]
    for z in zeros:
        z[:] = 0.0
    assert arena.merge().pages_zeroed == 8
    assert arena.stats().frames_in_use == 0


def test_zero_frames_are_per_node_with_use_zero_pages_off(two_nodes):
    arena, _ = two_nodes
    arena.merge_across_nodes = False
    arena.use_zero_pages = False
    arena.zero_page_colours = 1
    arena.tile_pages = 1                # one frame a node, not a tile
    zeros = [arena.zeros((4, PAGE_FLOATS), node=node) for node in (0, 1)]
    for z in zeros:
        z[:] = 0.0
    arena.merge()
    assert arena.stats().frames_by_node == {0: 1, 1: 1}


def test_a_merged_page_that_moved_is_merged_again_on_its_own_node(two_nodes, rng):
    arena, page_nodes = two_nodes
    arena.merge_across_nodes = False
    a = arena.array(rng.random((16, PAGE_FLOATS)), node=0)
    b = arena.array(a, node=0)
    c = arena.array(a, node=1)
    arena.merge()
    assert frame_offsets(b) == frame_offsets(a) != frame_offsets(c)
    page_nodes[pages_of(arena, b)] = 1          # b's pages move to node 1
    report = arena.merge()
    assert report.pages_moved == 16
    assert frame_offsets(b) == frame_offsets(c)
    assert arena.merge().pages_moved == 0
    assert arena.stats().frames_by_node == {0: 16, 1: 16}
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(c, a)


MOVE_EVERY_COPY = """
import numpy as np, pydedup
from pydedup import testing
from kernel import PAGE, address, frame_offsets
arena = pydedup.Arena(size=64 << 20, threads=1)
page_nodes = testing.simulate_numa(arena, 2)
arena.merge_across_nodes = False
a = arena.array(np.random.default_rng(5).random((16, PAGE // 8)), node=0)
b = arena.array(a, node=0)
arena.merge()
first = (address(a) - testing.address_range(arena)[0]) // PAGE
page_nodes[first:first + 32] = 1                 # a's pages and b's after them
report = arena.merge()
testing.check_invariants(arena)
assert (report.pages_moved, report.pages_merged, report.frames_new) == (32, 32, 16), report
assert frame_offsets(a) == frame_offsets(b) and None not in frame_offsets(a)
assert arena.stats().frames_by_node == {1: 16}
np.testing.assert_array_equal(a, b)
print("merged on node 1")
"""


def test_the_slots_of_frames_whose_pages_all_left_are_not_reused_in_the_same_pass():
    """Every page of some frames moves to another node: each goes home in
    one pass, its frames become orphans still in the stable tree, and the
    new frames of the pass must take other slots (taking theirs linked a
    frame into the tree twice, and the merge looped forever: in a child,
    so that such a loop fails the test instead of hanging the run)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", MOVE_EVERY_COPY], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=path))
    assert done.returncode == 0, done.stderr
    assert "merged on node 1" in done.stdout


def test_across_nodes_a_moved_page_stays_on_its_frame(two_nodes, rng):
    arena, page_nodes = two_nodes
    a = arena.array(rng.random((4, PAGE_FLOATS)), node=0)
    b = arena.array(a, node=0)
    arena.merge()
    page_nodes[pages_of(arena, b)] = 1
    assert arena.merge().pages_moved == 0
    assert frame_offsets(b) == frame_offsets(a)


def test_the_background_scanner_keeps_nodes_apart(two_nodes, rng):
    arena, _ = two_nodes
    arena.merge_across_nodes = False
    a0 = arena.array(rng.random((8, PAGE_FLOATS)), node=0)
    a1 = arena.array(a0, node=1)
    b1 = arena.array(a0, node=1)
    for _ in range(3):                          # a scan to see them, one to merge them
        testing.scan_step(arena)
    assert frame_offsets(a1) == frame_offsets(b1)
    assert frame_offsets(a0) == [None] * 8


def test_interleave_spreads_pages_over_the_nodes(two_nodes):
    arena, page_nodes = two_nodes
    a = arena.zeros((6, PAGE_FLOATS), node="interleave")
    assert list(page_nodes[pages_of(arena, a)]) == [0, 1, 0, 1, 0, 1]


# -- the kernel, for real, on node 0 --------------------------------------------------

def numa_policy_of(array):
    """The policy word of the mapping holding `array` in /proc/self/numa_maps."""
    with open("/proc/self/numa_maps") as f:
        for line in f:
            start, policy = line.split()[:2]
            if int(start, 16) <= address(array):
                found = policy
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/numa_maps"), reason="the kernel has no NUMA support")
def test_an_array_placed_on_node_0_gets_a_policy_until_it_is_freed(arena):
    a = arena.zeros((4, PAGE_FLOATS), node=0)
    assert numa_policy_of(a) == "prefer:0"
    b = arena.zeros((4, PAGE_FLOATS))
    assert numa_policy_of(b) == "default"
    lo = address(a)
    del a
    arena.stats()                               # the lock releases freed pages
    c = arena.zeros((4, PAGE_FLOATS))
    assert address(c) == lo and numa_policy_of(c) == "default"


@pytest.mark.skipif(not os.path.exists("/proc/self/numa_maps"), reason="the kernel has no NUMA support")
def test_a_placed_array_keeps_its_policy_through_merge_and_unmerge(arena, rng):
    # A remap replaces the mapping that held the policy: without it, copies
    # made by unmerge() or a write would go wherever the writing CPU is.
    a = arena.array(rng.random((8, PAGE_FLOATS)), node=0)
    b = arena.array(a, node=0)
    assert arena.merge().pages_merged == 16
    assert numa_policy_of(a) == numa_policy_of(b) == "prefer:0"
    arena.unmerge()
    assert numa_policy_of(a) == numa_policy_of(b) == "prefer:0"


def test_node_lookups_through_the_kernel_merge_on_node_0(arena, rng):
    # At least two nodes believed in: every lookup (move_pages) answers 0 for
    # pages placed there, and every frame is written preferring node 0.
    testing.core(arena).set_nodes(2)
    arena.merge_across_nodes = False
    a = arena.array(rng.random((16, PAGE_FLOATS)), node=0)
    b = arena.array(a, node=0)
    c = arena.zeros((4, PAGE_FLOATS), node=0)
    c[:] = 0.0
    report = arena.merge()
    assert (report.pages_merged, report.pages_zeroed, report.pages_moved) == (32, 4, 0)
    assert arena.stats().frames_by_node == {0: 16}
    b[0, 0] = 1.0                                # broken, then merged back
    b[0, 0] = a[0, 0]
    assert arena.merge().pages_merged == 1
    np.testing.assert_array_equal(a, b)
