# NUMA nodes (_numa.pxi): which node an arena page's memory is on, and the
# thread's memory policy while a pass writes frames for a node.

cdef enum:
    NO_NODE = 0xFFFF               # not present: on no node yet
    NODE_MASK_WORDS = 16           # longs in a NUMA node mask (PD_MAX_NODES bits)

cdef struct mem_policy:            # a thread's NUMA memory policy, kept to restore
    int mode
    unsigned long mask[NODE_MASK_WORDS]

cdef struct node_map:              # Core.nodes
    int nnodes                     # nodes pages may be on (1: no lookups)
    uint16_t *simulated            # a map page -> node nodes come from instead of the
                                   # kernel (tests), or NULL
    int policy_node                # the node a pass prefers for new memory, or -1
    mem_policy saved_policy        # the thread's own policy while policy_node >= 0

cdef void nodes_init(node_map *nm) noexcept nogil
cdef bint knows_nodes(const node_map *nm) noexcept nogil
cdef bint simulating(const node_map *nm) noexcept nogil
cdef uint16_t simulated_node(const node_map *nm, size_t p) noexcept nogil
cdef void read_nodes(const node_map *nm, const reservation *r, size_t first, size_t n,
                     const uint8_t *cats, uint16_t *out) noexcept nogil
cdef bint steers_memory(const node_map *nm) noexcept nogil
cdef void prefer_node(node_map *nm, uint16_t node) noexcept nogil
cdef void restore_policy(node_map *nm) noexcept nogil
