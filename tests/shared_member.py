"""A member of a shared store for tests/test_shared.py, run as its own
process: `python shared_member.py NAME SEED MIB`. It loads MIB MiB of
random data made from SEED into an arena on store NAME (or, with NAME "-",
the store PYDEDUP_SHARED names), then answers one command a line on stdin
with one JSON line on stdout."""
import contextlib
import gc
import json
import os
import resource
import signal
import sys
import threading
import time

import numpy as np

if os.environ.get("SLOW_CHILD"):    # a forked child waits before pydedup's hooks run
    os.register_at_fork(after_in_child=lambda: time.sleep(float(os.environ["SLOW_CHILD"])))

import pydedup  # noqa: E402  (after the hook above, so that it runs first)
from pydedup import procfs  # noqa: E402

FSIZE = resource.getrlimit(resource.RLIMIT_FSIZE)


def main():
    name, seed, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    arena = pydedup.Arena(size=1 << 30) if name == "-" else pydedup.Arena(size=1 << 30, shared=name)
    data = np.random.default_rng(seed).integers(0, 2**63, mib * 2**20 // 8, dtype=np.uint64)
    x = arena.array(data)
    pages = arena._live()
    say(dict(pid=os.getpid(), ready=True, shared=arena.shared))
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "merge":
            r = arena.merge()
            say(dict(merged=r.pages_merged, frames_new=r.frames_new,
                     no_memory=r.skipped["no_memory"]))
        elif cmd == "limit":            # pwrite into the frame store stops at frame args[0]
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(args[0]) * 4096, FSIZE[1]))
            say(dict(limited=True))
        elif cmd == "unlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, FSIZE)
            say(dict(limited=False))
        elif cmd == "loop":             # merge again and again, changing pages between
            i = 0
            while True:
                x[(i * 512) % x.size] += 1
                arena.merge()
                i += 1
        elif cmd == "scan":             # the background scanner, until all is shared
            arena.run = 1
            deadline = time.monotonic() + 20
            while arena.stats().shared_pages < x.nbytes // 4096 and time.monotonic() < deadline:
                time.sleep(0.05)
            arena.run = 0
            say(dict(shared_pages=arena.stats().shared_pages))
        elif cmd == "touch":            # read every page: merged pages map their frames
            say(dict(sum=int(x.sum(dtype=np.uint64))))
        elif cmd == "pss":
            say(dict(pss=procfs.process_pss()))
        elif cmd == "stats":
            s = arena.stats()
            say(dict(members=s.shared_members, shared_pages=s.shared_pages,
                     frames=s.frames_in_use, lost=s.members_lost,
                     repairs=s.shared_repairs, store=s.shared_store,
                     rss=s.shared_rss_bytes, pss=s.shared_pss_bytes))
        elif cmd == "check":
            pages.check_invariants()
            say(dict(checked=True))
        elif cmd == "write":            # write: x[i] = v
            x[int(args[0])] = int(args[1])
            say(dict(written=True))
        elif cmd == "verify":           # x equals the data, but for the writes listed
            expect = data.copy()
            for pair in args:
                i, v = pair.split("=")
                expect[int(i)] = int(v)
            say(dict(equal=bool(np.array_equal(x, expect))))
        elif cmd == "fork":             # a forked child checks, writes, merges, exits
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ok = np.array_equal(x, data)
                    x[1] = 7
                    arena.merge()
                    pages.check_invariants()
                    ok = ok and x[1] == 7 and np.array_equal(x[2:], data[2:])
                    code = 0 if ok and arena.stats().shared_members[0] == os.getpid() else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            say(dict(child=os.waitstatus_to_exitcode(status)))
        elif cmd == "nofds":            # merge with no file descriptor left
            with no_descriptor_left():
                try:
                    arena.merge()
                    error = None
                except OSError as e:
                    error = e.errno
            say(dict(error=error))
        elif cmd == "nofds-for":        # hold no file descriptor free for args[0] seconds
            with no_descriptor_left() as fds:
                say(dict(filled=len(fds)))
                time.sleep(float(args[0]))
            say(dict(freed=True))
        elif cmd == "orphan":           # fork and exit at once; the child checks later
            pid = os.fork()
            if pid == 0:
                time.sleep(float(args[1]))
                with open(args[0], "w") as f:
                    json.dump(dict(equal=bool(np.array_equal(x, data))), f)
                os._exit(0)
            say(dict(child=pid))
            os._exit(0)
        elif cmd == "fill":             # forked children that hold every member slot left
            held, keep = [], os.pipe()
            for _ in range(int(args[0])):
                pid = os.fork()
                if pid == 0:
                    os.close(keep[1])
                    os.read(keep[0], 1)
                    os._exit(0)
                held.append(pid)
            os.close(keep[0])
            say(dict(children=len(held)))
        elif cmd == "unfill":
            os.close(keep[1])
            for pid in held:
                os.waitpid(pid, 0)
            say(dict(members=arena.stats().shared_members))
        elif cmd == "fork-free":        # fork, then free merged pages only this process maps
            mine = np.random.default_rng(99).integers(0, 2**63, 2**20, dtype=np.uint64)
            y = arena.array(mine)
            arena.merge()
            pid = os.fork()
            if pid == 0:
                os._exit(0 if np.array_equal(y, mine) else 1)
            del y
            arena.merge()
            _, status = os.waitpid(pid, 0)
            say(dict(child=os.waitstatus_to_exitcode(status)))
        elif cmd == "fork-signal":      # a signal whose handler raises, while the fork waits
            def alarm(*_):
                raise RuntimeError("the alarm's handler")
            signal.signal(signal.SIGALRM, alarm)
            signal.setitimer(signal.ITIMER_REAL, float(args[0]))
            start = time.monotonic()
            try:
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
            except RuntimeError:        # raised once the fork's hooks are done
                pid = None
            waited = time.monotonic() - start
            merger = threading.Thread(target=arena.merge, daemon=True)
            merger.start()
            merger.join(10)             # a lock the fork left held would stop it
            say(dict(waited=waited, merged=not merger.is_alive()))
        elif cmd == "fork-exec":        # a child forked with the arena runs another program
            pid = os.fork()
            if pid == 0:
                os.execv(args[0], args)
            say(dict(child=pid))
        elif cmd == "leave":            # close the arena and drop its arrays: a member no more
            arena.close()
            del x, pages
            gc.collect()
            deadline = time.monotonic() + 10
            while memfds() and time.monotonic() < deadline:
                time.sleep(0.05)        # the store's thread lets them go
            say(dict(memfds=memfds()))
        elif cmd == "quit":
            return


@contextlib.contextmanager
def no_descriptor_left():
    """Take every file descriptor left (under a limit of 256); the list of
    them. Given back, and the limit restored, at the end."""
    fds = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def memfds():
    """The store's memfds this process holds."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:       # the listing's own
            pass
    return sorted(link for link in links if link.startswith("/memfd:pydedup-"))


def say(message):
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    main()
