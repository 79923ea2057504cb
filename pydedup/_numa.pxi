# NUMA, after KSM's merge_across_nodes: which node an arena page's memory is
# on, the node a frame is written on, and one stable and one unstable tree a
# node. Merging a page onto a frame on a distant node would make every later
# access to it remote, so with merge_across_nodes off a page only shares a
# frame of its own node, and a frame is written on the node of the pages it
# replaces. On a machine of one node nothing here asks the kernel anything.
#
# A page's own node is the node of its own memory when it was last hashed
# (move_pages with no target node reports it). Tests may simulate nodes with a
# map page -> node (Core.simulate_nodes): pages are then on the node the map
# says, and frames on the node they were written for.

cdef enum:
    NO_NODE = 0xFFFF                    # not present: on no node yet


cdef inline uint32_t tree_key(Core c, uint32_t checksum, uint16_t node) noexcept nogil:
    """The bucket key of a page or frame: with merge_across_nodes off, each
    node's pages hash apart, as if in trees of their own."""
    if c.merge_across_nodes:
        return checksum
    return checksum ^ (<uint32_t>node * 0x9E3779B1u)


cdef inline bint same_tree(Core c, uint16_t a, uint16_t b) noexcept nogil:
    return c.merge_across_nodes or a == b


cdef inline bint knows_nodes(Core c) noexcept nogil:
    return c.nnodes > 1 or c.simulated != NULL


cdef void read_nodes(Core c, size_t first, size_t n, const uint8_t *cats,
                     uint16_t *out) noexcept nogil:
    """The node of each present page of [first, first + n); NO_NODE for
    pages not present, or where the kernel cannot say."""
    cdef void **pages
    cdef int *status
    cdef size_t i, asked = 0
    if c.simulated != NULL:
        for i in range(n):
            out[i] = c.simulated[first + i]
        return
    for i in range(n):
        out[i] = NO_NODE
    pages = <void **>malloc(n * sizeof(void *))
    status = <int *>malloc(n * sizeof(int))
    if pages != NULL and status != NULL:
        for i in range(n):
            if cats[i] & PD_PAGE_IS_PRESENT and c.rmap[first + i].state != PAGE_FREE:
                pages[asked] = page_address(c, first + i)
                asked += 1
        if asked and pd_move_pages(asked, pages, status) == 0:
            asked = 0
            for i in range(n):
                if cats[i] & PD_PAGE_IS_PRESENT and c.rmap[first + i].state != PAGE_FREE:
                    out[i] = <uint16_t>status[asked] if 0 <= status[asked] < NO_NODE else NO_NODE
                    asked += 1
    free(pages)
    free(status)


cdef inline bint places_memory(Core c, uint16_t node) noexcept nogil:
    """Whether memory must be steered to `node` (a real machine of nodes)."""
    return c.nnodes > 1 and c.simulated == NULL and node < PD_MAX_NODES


cdef void prefer_node(Core c, uint16_t node) noexcept nogil:
    """This thread's next allocations come from `node` where it has memory:
    a shmem file's pages (frames) are allocated under the writer's policy.
    The thread's own policy is kept and comes back at the end of the pass
    (restore_policy); in between the policy changes only with the node."""
    cdef unsigned long mask[NODE_MASK_WORDS]
    if not places_memory(c, node) or node == c.policy_node:
        return
    if c.policy_node < 0 and pd_get_mempolicy(&c.saved_policy.mode, c.saved_policy.mask) != 0:
        return
    memset(mask, 0, sizeof(mask))
    mask[node // 64] = 1UL << (node % 64)
    c.policy_node = node if pd_set_mempolicy(PD_MPOL_PREFERRED, mask) == 0 else c.policy_node


cdef void restore_policy(Core c) noexcept nogil:
    if c.policy_node >= 0:
        pd_set_mempolicy(c.saved_policy.mode, c.saved_policy.mask)
        c.policy_node = -1


cdef inline bint away_from_home(Core c, size_t p, uint16_t seen) noexcept nogil:
    """Whether MERGED page p's frame is on another node than the page's own:
    the kernel migrated the frame (`seen` is where the page's memory is
    now), or, simulated, the map moved the page."""
    if c.simulated != NULL:
        return c.simulated[p] != c.frames[c.rmap[p].frame].node
    return seen != NO_NODE and seen != c.rmap[p].node


cdef int go_home(Core c, size_t p, pass_stats *st) noexcept nogil:
    """Give merged page p a private copy on its own node, where this pass
    merges it again, in its node's trees."""
    cdef uint16_t home = c.simulated[p] if c.simulated != NULL else c.rmap[p].node
    cdef int err
    prefer_node(c, home)
    err = populate_write(c, p, 1)
    if err:
        return err
    frame_put(c, c.rmap[p].frame)
    c.rmap[p].state = PAGE_BROKEN
    c.rmap[p].flags &= ~PAGE_CHECKSUMMED
    c.rmap[p].node = home
    st.moved += 1
    return 0
