# Spending the mapping budget (_budget.pxi): when it cannot pay every run of
# a pass's targets, which contents are merged whole and which stay private.
# No record kept between passes: a plan lives from deciding the targets to
# applying them.

cdef enum:
    NO_CONTENT = 0xFFFFFFFF        # budget_plan.content of a page whose mapping no target changes

cdef struct budget_content:        # one content: the pages with targets onto its frames
    double value                   # pages it saves per mapping it costs, alone
    uint64_t new_frames            # frames only its targets would map: kept for it
    long cost                      # the mappings its pages add alone
    uint32_t number                # its number: budget_plan.content of its pages
    uint32_t first                 # its pages: budget_plan.pages[first : first + n]
    uint32_t n

cdef struct budget_plan:           # what a pass's budget pays, from deciding to applying
    size_t npages                  # the pages looked at: [0, high_water)
    uint32_t *content              # each page's content, or NO_CONTENT
    uint8_t *kept                  # each page: 1 if the budget pays its remap
    signed char *bonus             # at a run's first page: mappings the kernel says the
                                   # run costs less than the rule (predict_remap_cost)
    uint32_t *pages                # the pages of each content, in address order
    budget_content *contents
    size_t ncontents

cdef void apply_within_budget(Core c, scan_knobs *k, pass_stats *st) noexcept nogil
