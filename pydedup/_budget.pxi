# Spending the mapping budget on whole contents (issue 15: "decide with the
# mapping cost in view"). A pass decides its targets page by page
# (_scan.pxi); applying them (_remap.pxi) costs mappings, a run of pages onto
# consecutive frames up to MAPPINGS_PER_REMAP, zero pages in anonymous memory
# none. When the budget pays every run at that worst case, this part does
# nothing and the targets are applied as decided. Otherwise, between deciding
# and applying (after keep_huge_pages), it chooses what the budget pays:
#
#   - a content: the pages whose targets are frames of one content (one
#     checksum: every frame of a tile, the frames max_page_sharing splits a
#     content into); a run of zero pages in the frame store is one too;
#   - what a content saves: its pages, less the frames only its pages would
#     map (kept for it); what it costs: the mappings its pages add (below);
#   - contents go in order of pages saved per mapping (zero pages in
#     anonymous memory cost none and always go; a run of consecutive frames,
#     a copied array say, saves many pages a mapping; a scattered duplicate
#     about half a page), each whole while the budget pays it; the targets of
#     the others are dropped, and the frames no page maps then are orphans,
#     reclaimed after the pass as any.
#
# With scan_knobs.whole_contents (kernel KSM takes what is left: the
# kernel_ksm knob on and ksmd running), a content the budget cannot finish
# stays wholly private, and the kernel merges all its copies into one KSM
# page; merged in part it would be kept twice, on a frame and on a KSM page
# (KSM merges anonymous pages only). Without it, what the budget has left goes
# to the best unfinished contents page by page, in address order, as apply
# spent it before; a content is not begun for one page, which saves nothing.
#
# The background scanner applies the rule to each step's targets: copies of
# a content that an earlier step merged stay merged.
#
# -- what a content costs -------------------------------------------------------
#
# The arena's range holds one mapping more than there are boundaries between
# neighbouring pages in different mappings, and a remap changes only the
# boundaries next to the pages it remaps. After the pass, two neighbours that
# are both remapped lie in one mapping if apply puts them in one run (the
# same kind, consecutive frames of one memfd), else in two; a page remapped
# next to one that is not lies in a mapping of its own on that side (the
# kernel may join them: at most one boundary). Before the pass, the rmap
# items show a boundary for certain between a page in anonymous memory
# (PRIVATE, ZERO, FREE) and one in the frame store (MERGED, BROKEN), and
# between two MERGED pages whose frames are not neighbours in one memfd
# (frames_adjoin: the kernel may have joined a mapping of the last frame of
# a stripe with one of the first of that memfd's next stripe); elsewhere
# there may be one or not (anonymous mappings cut by earlier remaps stay
# cut). So counting the boundaries after, less the certain ones before, gives
# at least what the kernel will do. A run none of whose neighbours is
# remapped, next to pages in the frame store (a BROKEN page going back onto
# its frame between its old neighbours, say), is asked of the kernel's
# mappings instead (predict_remap_cost), which may say it costs none.
#
# apply_targets() charges each run its worst case. The plan knows what its
# runs cost together, at most that, so apply is lent the difference (the
# budget it sees is raised by it, and lowered again to what the plan left
# after it), and pays every run the plan kept.

cdef inline bint in_frame_store(uint8_t state) noexcept nogil:
    return state == PAGE_MERGED or state == PAGE_BROKEN


cdef bint apart(Core c, size_t q) noexcept nogil:
    """Whether pages q and q + 1 lie in different mappings now, for certain.
    A page outside the reservation counts as anonymous memory."""
    cdef uint8_t a = c.res.rmap[q].state if q < c.res.npages else PAGE_FREE
    cdef uint8_t b = c.res.rmap[q + 1].state if q + 1 < c.res.npages else PAGE_FREE
    if in_frame_store(a) != in_frame_store(b):
        return True
    if a == PAGE_MERGED and b == PAGE_MERGED:
        return not frames_adjoin(&c.store, c.res.rmap[q].frame, c.res.rmap[q + 1].frame)
    return False


cdef inline bint remapped(const budget_plan *pl, size_t x, uint32_t adding, size_t also) noexcept nogil:
    """Whether page x is remapped if the kept pages are, and those of
    content `adding`, and page `also`."""
    return (x < pl.npages and pl.content[x] != NO_CONTENT
            and (pl.kept[x] or pl.content[x] == adding or x == also))


cdef bint one_run(Core c, size_t q) noexcept nogil:
    """Whether apply puts remapped pages q and q + 1 in one run."""
    cdef run_kind k = target_kind(c, q)
    if k != target_kind(c, q + 1):
        return False
    return k != RUN_FRAMES or continues_run(c, q, 1, c.res.rmap[q + 1].frame)


cdef int boundary_after(Core c, const budget_plan *pl, size_t q, uint32_t adding,
                        size_t also) noexcept nogil:
    """Whether pages q and q + 1 lie in different mappings after the pass,
    at most (see above); as now if neither is remapped."""
    cdef bint a = remapped(pl, q, adding, also), b = remapped(pl, q + 1, adding, also)
    if not a and not b:
        return apart(c, q)
    return 0 if a and b and one_run(c, q) else 1


cdef inline int edge_cost(Core c, const budget_plan *pl, size_t q, uint32_t adding,
                          size_t also) noexcept nogil:
    """What remapping content `adding` or page `also` too changes at the
    boundary between pages q and q + 1."""
    return (boundary_after(c, pl, q, adding, also)
            - boundary_after(c, pl, q, NO_CONTENT, <size_t>-1))


cdef long content_cost(Core c, const budget_plan *pl, const budget_content *u) noexcept nogil:
    """The mappings content u adds once the kept pages are remapped: each
    boundary next to its pages counted once, less what the kernel said its
    runs save."""
    cdef size_t i, p
    cdef long cost = 0
    for i in range(u.first, u.first + u.n):
        p = pl.pages[i]
        cost += edge_cost(c, pl, p - 1, u.number, <size_t>-1) - pl.bonus[p]
        if p + 1 >= pl.npages or pl.content[p + 1] != u.number:
            cost += edge_cost(c, pl, p, u.number, <size_t>-1)
    return cost


cdef inline long page_cost(Core c, const budget_plan *pl, size_t p) noexcept nogil:
    """The mappings page p alone adds once the kept pages are remapped."""
    return edge_cost(c, pl, p - 1, NO_CONTENT, p) + edge_cost(c, pl, p, NO_CONTENT, p)


# -- the plan: contents and their pages ---------------------------------------------

cdef long runs_worst_cost(Core c) noexcept nogil:
    """What apply_targets() will charge the runs it cuts the targets into,
    each at its worst."""
    cdef size_t p, first = 0, n = 0
    cdef run_kind kind = RUN_NONE, k
    cdef long worst = 0
    for p in range(c.res.high_water + 1):
        k = target_kind(c, p) if p < c.res.high_water else RUN_NONE
        if n and k == kind and (k != RUN_FRAMES or continues_run(c, first, n, c.res.rmap[p].frame)):
            n += 1
            continue
        if n:
            worst += worst_remap_cost(kind)
        first, kind = p, k
        n = 1 if k != RUN_NONE else 0
    return worst


cdef void plan_close(budget_plan *pl) noexcept nogil:
    free(pl.content)
    free(pl.kept)
    free(pl.bonus)
    free(pl.pages)
    free(pl.contents)
    memset(pl, 0, sizeof(budget_plan))


cdef uint32_t checksum_content(uint32_t *table, size_t mask, uint32_t checksum,
                               size_t *ncontents) noexcept nogil:
    """The number of the content of `checksum`, a new one the first time
    (table: (checksum, number) pairs, open addressing, NO_CONTENT-filled)."""
    cdef size_t slot = checksum & mask
    while table[2 * slot + 1] != NO_CONTENT and table[2 * slot] != checksum:
        slot = (slot + 1) & mask
    if table[2 * slot + 1] == NO_CONTENT:
        table[2 * slot] = checksum
        table[2 * slot + 1] = <uint32_t>ncontents[0]
        ncontents[0] += 1
    return table[2 * slot + 1]


cdef int number_contents(Core c, budget_plan *pl, size_t *ntargets) noexcept nogil:
    """Each page's content (see above), and how many pages change mapping."""
    cdef size_t p, mask = 15, n = 0
    cdef run_kind k
    cdef uint32_t *table
    for p in range(pl.npages):
        n += target_kind(c, p) == RUN_FRAMES
    while mask + 1 < 2 * n:
        mask = 2 * mask + 1
    table = <uint32_t *>malloc(2 * (mask + 1) * sizeof(uint32_t))
    if table == NULL:
        return ENOMEM
    memset(table, 0xFF, 2 * (mask + 1) * sizeof(uint32_t))
    ntargets[0] = 0
    for p in range(pl.npages):
        k = target_kind(c, p)
        if k == RUN_FRAMES:
            pl.content[p] = checksum_content(table, mask, c.res.rmap[p].checksum, &pl.ncontents)
        elif k == RUN_ZERO_FILE and p > 0 and target_kind(c, p - 1) == RUN_ZERO_FILE:
            pl.content[p] = pl.content[p - 1]
        elif k == RUN_ZERO_FILE:
            pl.content[p] = <uint32_t>pl.ncontents
            pl.ncontents += 1
        else:
            pl.content[p] = NO_CONTENT
        ntargets[0] += pl.content[p] != NO_CONTENT
    free(table)
    return 0


cdef int gather_contents(Core c, budget_plan *pl, size_t ntargets) noexcept nogil:
    """The contents' pages in address order, and the frames each would keep."""
    cdef size_t p, u
    cdef uint32_t f
    cdef uint32_t *targets = <uint32_t *>calloc(max(<size_t>frames_high(&c.store), <size_t>1),
                                                sizeof(uint32_t))
    pl.contents = <budget_content *>calloc(max(pl.ncontents, <size_t>1), sizeof(budget_content))
    pl.pages = <uint32_t *>malloc(max(ntargets, <size_t>1) * sizeof(uint32_t))
    if targets == NULL or pl.contents == NULL or pl.pages == NULL:
        free(targets)
        return ENOMEM
    for p in range(pl.npages):
        if pl.content[p] != NO_CONTENT:
            pl.contents[pl.content[p]].n += 1
            if target_kind(c, p) == RUN_FRAMES:
                targets[c.res.rmap[p].frame] += 1
    for u in range(1, pl.ncontents):
        pl.contents[u].first = pl.contents[u - 1].first + pl.contents[u - 1].n
    for u in range(pl.ncontents):
        pl.contents[u].number = <uint32_t>u
        pl.contents[u].n = 0
    for p in range(pl.npages):
        if pl.content[p] == NO_CONTENT:
            continue
        u = pl.content[p]
        pl.pages[pl.contents[u].first + pl.contents[u].n] = <uint32_t>p
        pl.contents[u].n += 1
        f = c.res.rmap[p].frame
        if target_kind(c, p) == RUN_FRAMES and targets[f] != 0:
            # f's first target: does any page map f already?
            pl.contents[u].new_frames += targets[f] == frame_mapcount(&c.store, f)
            targets[f] = 0
    free(targets)
    return 0


cdef void ask_the_kernel(Core c, budget_plan *pl) noexcept nogil:
    """bonus[]: for each run of one content with no remapped neighbour, next
    to pages in the frame store, what predict_remap_cost() says it costs
    less than the rule (see above)."""
    cdef size_t p = 0, end, q
    cdef long rule
    cdef remap_cost kernel
    while p < pl.npages:
        if pl.content[p] == NO_CONTENT:
            p += 1
            continue
        end = p + 1
        while end < pl.npages and pl.content[end] == pl.content[p] and one_run(c, end - 1):
            end += 1
        if ((p == 0 or pl.content[p - 1] == NO_CONTENT)
                and (end >= pl.npages or pl.content[end] == NO_CONTENT)
                and (p > 0 and in_frame_store(c.res.rmap[p - 1].state)
                     or end < c.res.npages and in_frame_store(c.res.rmap[end].state)
                     or c.res.rmap[p].state == PAGE_BROKEN)):
            rule = 2 - apart(c, p - 1) - apart(c, end - 1)
            for q in range(p, end - 1):
                rule -= apart(c, q)
            if (predict_remap_cost(c, p, end - p, target_kind(c, p), &kernel)
                    and kernel.predicted < rule):
                pl.bonus[p] = <signed char>min(rule - kernel.predicted, <long>100)
        p = end


cdef int plan_open(Core c, budget_plan *pl) noexcept nogil:
    """The contents of the pass's targets and what each saves and costs
    alone. 0 or ENOMEM."""
    cdef size_t u, ntargets = 0
    cdef double saved
    cdef int err
    memset(pl, 0, sizeof(budget_plan))
    pl.npages = c.res.high_water
    pl.content = <uint32_t *>malloc(max(pl.npages, <size_t>1) * sizeof(uint32_t))
    pl.kept = <uint8_t *>calloc(max(pl.npages, <size_t>1), 1)
    pl.bonus = <signed char *>calloc(max(pl.npages, <size_t>1), 1)
    if pl.content == NULL or pl.kept == NULL or pl.bonus == NULL:
        return ENOMEM
    err = number_contents(c, pl, &ntargets)
    if err == 0:
        err = gather_contents(c, pl, ntargets)
    if err:
        return err
    ask_the_kernel(c, pl)
    for u in range(pl.ncontents):
        pl.contents[u].cost = content_cost(c, pl, &pl.contents[u])
        saved = <double>pl.contents[u].n - <double>pl.contents[u].new_frames
        pl.contents[u].value = saved / pl.contents[u].cost if pl.contents[u].cost > 0 else 1e18 + saved
    return 0


cdef int by_value(const void *a, const void *b) noexcept nogil:
    cdef const budget_content *x = <const budget_content *>a
    cdef const budget_content *y = <const budget_content *>b
    if x.value != y.value:
        return -1 if x.value > y.value else 1
    return (x.number > y.number) - (x.number < y.number)


# -- choosing ----------------------------------------------------------------------

cdef long keep_whole(Core c, budget_plan *pl, const budget_content *u, long left) noexcept nogil:
    """Keep every page of content u if `left` mappings pay them; what they cost."""
    cdef long cost = content_cost(c, pl, u)
    cdef size_t i
    if cost > left:
        return 0
    for i in range(u.first, u.first + u.n):
        pl.kept[pl.pages[i]] = 1
    return cost


cdef long keep_part(Core c, budget_plan *pl, const budget_content *u, long left) noexcept nogil:
    """Keep the pages of content u that `left` mappings pay, in address
    order; none if that is one page. What they cost."""
    cdef size_t i, p, taken = 0
    cdef long cost, spent = 0
    for i in range(u.first, u.first + u.n):
        p = pl.pages[i]
        cost = page_cost(c, pl, p)
        if spent + cost <= left:
            pl.kept[p] = 1
            spent += cost
            taken += 1
    if taken >= 2:
        return spent
    for i in range(u.first, u.first + u.n):
        pl.kept[pl.pages[i]] = 0        # undone: nothing else changed meanwhile
    return 0


cdef long choose(Core c, budget_plan *pl, long budget, bint whole) noexcept nogil:
    """Mark the pages the budget pays, best contents first (see above);
    what they cost together."""
    cdef size_t u
    cdef long left = budget
    qsort(pl.contents, pl.ncontents, sizeof(budget_content), by_value)
    for u in range(pl.ncontents):
        left -= keep_whole(c, pl, &pl.contents[u], left)
    for u in range(pl.ncontents if not whole else 0):
        if not pl.kept[pl.pages[pl.contents[u].first]]:
            left -= keep_part(c, pl, &pl.contents[u], left)
    return budget - left


cdef void drop_unpaid(Core c, const budget_plan *pl, pass_stats *st) noexcept nogil:
    """The targets of the pages not kept go, counted as the budget's, and so
    does each content not kept whole."""
    cdef size_t u, i, p
    cdef bint whole
    for u in range(pl.ncontents):
        whole = True
        for i in range(pl.contents[u].first, pl.contents[u].first + pl.contents[u].n):
            p = pl.pages[i]
            if not pl.kept[p]:
                drop_targets(c, p, 1)
                st.skipped_budget += 1
                whole = False
        st.contents_left += not whole


cdef long spend_budget(Core c, bint whole, pass_stats *st) noexcept nogil:
    """Drop the targets the budget does not pay (see above), and lend apply
    the difference between the worst case of the runs kept and what they
    cost. Returns the budget the plan leaves; -1 if the budget pays every run
    at its worst (nothing changes) or memory ran out (apply spends the budget
    alone, in address order)."""
    cdef budget_plan pl
    cdef long spent, budget = max(st.mappings_left, 0)
    if runs_worst_cost(c) <= budget:
        return -1
    if plan_open(c, &pl) != 0:
        plan_close(&pl)
        return -1
    spent = choose(c, &pl, budget, whole)
    drop_unpaid(c, &pl, st)
    plan_close(&pl)
    st.mappings_left = budget + runs_worst_cost(c) - spent
    return budget - spent


cdef void apply_within_budget(Core c, scan_knobs *k, pass_stats *st) noexcept nogil:
    """apply_targets(), once the budget is spent on whole contents (above)."""
    cdef long left = spend_budget(c, k.whole_contents, st)
    apply_targets(c, st, left >= 0)
    if left >= 0 and st.mappings_left > left:
        st.mappings_left = left         # what was lent and not charged goes back
