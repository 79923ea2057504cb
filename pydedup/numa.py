"""The machine's NUMA nodes, from /sys/devices/system/node: their CPUs and
memory. A kernel without NUMA support has no such directory and is one node
holding every CPU."""
import os
from dataclasses import dataclass

NODE_DIR = "/sys/devices/system/node"


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple          # CPU numbers
    memory_bytes: int    # MemTotal of the node; 0 for a node of CPUs only


@dataclass(frozen=True)
class Topology:
    nodes: tuple         # Node, by id
    from_kernel: bool    # False: no NUMA support, one node assumed

    @property
    def node_ids(self) -> tuple:
        return tuple(node.id for node in self.nodes)

    @property
    def nodes_with_memory(self) -> tuple:
        return tuple(node.id for node in self.nodes if node.memory_bytes)

    def check(self, node) -> tuple:
        """The node ids `node` asks for: an int, 'interleave' (every node with
        memory) or None (the kernel's default, an empty tuple)."""
        if node is None:
            return ()
        if node == "interleave":
            return self.nodes_with_memory
        if isinstance(node, bool) or not isinstance(node, int):
            raise TypeError(f"node must be a NUMA node number, 'interleave' or None, not {node!r}")
        if node not in self.node_ids:
            raise ValueError(f"there is no NUMA node {node}: this machine has nodes {list(self.node_ids)}")
        return (node,)


def topology(root: str = NODE_DIR) -> Topology:
    try:
        names = sorted(name for name in os.listdir(root) if name[4:].isdigit() and name.startswith("node"))
    except FileNotFoundError:
        names = []
    if not names:
        return Topology((Node(0, tuple(sorted(os.sched_getaffinity(0))), _physical_memory()),), False)
    return Topology(tuple(_read_node(os.path.join(root, name), int(name[4:])) for name in names), True)


def _read_node(path: str, node_id: int) -> Node:
    with open(os.path.join(path, "cpulist")) as f:
        cpus = _parse_cpulist(f.read())
    memory = 0
    with open(os.path.join(path, "meminfo")) as f:
        for line in f:
            if "MemTotal:" in line:
                memory = int(line.split()[-2]) * 1024
    return Node(node_id, cpus, memory)


def _parse_cpulist(text: str) -> tuple:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
