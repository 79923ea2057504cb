# NUMA, after KSM's merge_across_nodes: which node an arena page's memory is
# on, and the node a frame is written on. Merging a page onto a frame on a
# distant node would make every later access to it remote, so with
# merge_across_nodes off a page only shares a frame of its own node (the
# frame store keys its stable tree by node, _frames.pxi), and a frame is
# written on the node of the pages it replaces. On a machine of one node
# nothing here asks the kernel anything.
#
# A page's own node is the node of its own memory when it was last hashed
# (move_pages with no target node reports it). Tests may simulate nodes with a
# map page -> node (Core.simulate_nodes): pages are then on the node the map
# says, and frames on the node they were written for.

cdef void nodes_init(node_map *nm) noexcept nogil:
    nm.nnodes = 1
    nm.simulated = NULL
    nm.policy_node = -1


cdef bint knows_nodes(const node_map *nm) noexcept nogil:
    return nm.nnodes > 1 or nm.simulated != NULL


cdef bint simulating(const node_map *nm) noexcept nogil:
    """Whether nodes come from a simulated map (Core.simulate_nodes)."""
    return nm.simulated != NULL


cdef uint16_t simulated_node(const node_map *nm, size_t p) noexcept nogil:
    """Page p's node in the simulated map."""
    PD_ASSERT(nm.simulated != NULL, "simulated_node: simulating")
    return nm.simulated[p]


cdef void read_nodes(const node_map *nm, const reservation *r, size_t first, size_t n,
                     const uint8_t *cats, uint16_t *out) noexcept nogil:
    """The node of each present page of [first, first + n); NO_NODE for
    pages not present, or where the kernel cannot say."""
    cdef void **pages
    cdef int *status
    cdef size_t i, asked = 0
    PD_ASSERT(first + n <= r.npages, "read_nodes: pages of the reservation")
    if nm.simulated != NULL:
        for i in range(n):
            out[i] = nm.simulated[first + i]
        return
    for i in range(n):
        out[i] = NO_NODE
    pages = <void **>malloc(n * sizeof(void *))
    status = <int *>malloc(n * sizeof(int))
    if pages != NULL and status != NULL:
        for i in range(n):
            if cats[i] & PD_PAGE_IS_PRESENT and r.rmap[first + i].state != PAGE_FREE:
                pages[asked] = page_address(r, first + i)
                asked += 1
        if asked and pd_move_pages(asked, pages, status) == 0:
            asked = 0
            for i in range(n):
                if cats[i] & PD_PAGE_IS_PRESENT and r.rmap[first + i].state != PAGE_FREE:
                    out[i] = <uint16_t>status[asked] if 0 <= status[asked] < NO_NODE else NO_NODE
                    asked += 1
    free(pages)
    free(status)


cdef inline bint places_memory(const node_map *nm, uint16_t node) noexcept nogil:
    """Whether memory must be steered to `node` (a real machine of nodes)."""
    return nm.nnodes > 1 and nm.simulated == NULL and node < PD_MAX_NODES


cdef bint steers_memory(const node_map *nm) noexcept nogil:
    """Whether prefer_node() may set a policy: then frames are written by
    the thread that set it (_frames.pxi frame_write), not by helpers."""
    return nm.nnodes > 1 and nm.simulated == NULL


cdef void prefer_node(node_map *nm, uint16_t node) noexcept nogil:
    """This thread's next allocations come from `node` where it has memory:
    a shmem file's pages (frames) are allocated under the writer's policy.
    The thread's own policy is kept and comes back at the end of the pass
    (restore_policy); in between the policy changes only with the node."""
    cdef unsigned long mask[NODE_MASK_WORDS]
    if not places_memory(nm, node) or node == nm.policy_node:
        return
    if nm.policy_node < 0 and pd_get_mempolicy(&nm.saved_policy.mode, nm.saved_policy.mask) != 0:
        return
    memset(mask, 0, sizeof(mask))
    mask[node // 64] = 1UL << (node % 64)
    nm.policy_node = node if pd_set_mempolicy(PD_MPOL_PREFERRED, mask) == 0 else nm.policy_node


cdef void restore_policy(node_map *nm) noexcept nogil:
    if nm.policy_node >= 0:
        pd_set_mempolicy(nm.saved_policy.mode, nm.saved_policy.mask)
        nm.policy_node = -1
