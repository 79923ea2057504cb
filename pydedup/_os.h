/* The operating-system layer of pydedup: what the Linux uapi headers of an
 * older build host may lack, and the small helpers that must be plain C. */
#ifndef PYDEDUP_OS_H
#define PYDEDUP_OS_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#ifndef MADV_POPULATE_WRITE           /* Linux 5.14 */
#define MADV_POPULATE_WRITE 23
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_KEEP_SIZE  0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

/* PAGEMAP_SCAN (Linux 6.7), declared here because build hosts may carry
 * older <linux/fs.h>. The ioctl answers ENOTTY on kernels without it. */
#define PD_PAGE_IS_WPALLOWED (1 << 0)
#define PD_PAGE_IS_WRITTEN   (1 << 1)
#define PD_PAGE_IS_FILE      (1 << 2)
#define PD_PAGE_IS_PRESENT   (1 << 3)
#define PD_PAGE_IS_SWAPPED   (1 << 4)
#define PD_PAGE_IS_PFNZERO   (1 << 5)
#define PD_PAGE_IS_HUGE      (1 << 6)   /* PMD-mapped: a transparent huge page */

#define PD_PM_SCAN_WP_MATCHING  (1 << 0)   /* write-protect the pages it reports */

struct pd_page_region { uint64_t start, end, categories; };

struct pd_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define PD_PAGEMAP_SCAN _IOWR('f', 16, struct pd_pm_scan_arg)

/* PROCMAP_QUERY (Linux 6.11): the mapping of /proc/self/maps that covers an
 * address, or the next one, as one ioctl. Older kernels answer ENOTTY. */
#define PD_PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10

struct pd_procmap_query {
    uint64_t size, query_flags, query_addr;
    uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};

#define PD_PROCMAP_QUERY _IOWR('f', 17, struct pd_procmap_query)

/* NUMA memory policy (mempolicy.h), through syscall(2): no libnuma needed.
 * Kernels without CONFIG_NUMA answer ENOSYS. */
#define PD_MPOL_DEFAULT    0
#define PD_MPOL_PREFERRED  1
#define PD_MPOL_INTERLEAVE 3
#define PD_MAX_NODES       1024     /* bits in a node mask */

static inline long pd_move_pages(unsigned long count, void **pages, int *status)
{
    /* No target nodes: only report the node of each page, or -errno. */
    return syscall(SYS_move_pages, 0, count, pages, NULL, status, 0);
}

static inline long pd_set_mempolicy(int mode, const unsigned long *nodemask)
{
    return syscall(SYS_set_mempolicy, mode, nodemask, nodemask ? PD_MAX_NODES + 1 : 0);
}

static inline long pd_get_mempolicy(int *mode, unsigned long *nodemask)
{
    return syscall(SYS_get_mempolicy, mode, nodemask, PD_MAX_NODES + 1, NULL, 0);
}

static inline long pd_mbind(void *addr, unsigned long length, int mode,
                            const unsigned long *nodemask)
{
    return syscall(SYS_mbind, addr, length, mode, nodemask, nodemask ? PD_MAX_NODES + 1 : 0, 0);
}

static inline int pd_memfd_create(const char *name)
{
    return (int)syscall(SYS_memfd_create, name, 1 /* MFD_CLOEXEC: not for exec'd programs */);
}

/* Whether a page holds only zero bytes. Most pages that are not zero differ
 * in their first bytes, so look there first; then OR whole cache lines. */
static inline int pd_page_is_zero(const void *page, size_t size)
{
    const uint64_t *w = (const uint64_t *)page;
    size_t n = size / sizeof(uint64_t);
    if (w[0] | w[1] | w[2] | w[3])
        return 0;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3]
                     | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}

/* Fault a page in for writing without changing it, even while other threads
 * write it: an atomic OR of zero is a write that cannot lose theirs. The
 * fallback for kernels without MADV_POPULATE_WRITE. */
static inline void pd_touch_write(void *page)
{
    __atomic_fetch_or((uint64_t *)page, 0, __ATOMIC_RELAXED);
}

/* A load of what p points at, started now, for later. */
static inline void pd_prefetch(const void *p)
{
    __builtin_prefetch(p);
}

#endif
