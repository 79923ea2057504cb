"""A frame store shared by processes (issue 16): members are real spawned
processes (tests/shared_member.py), so what is checked is what the kernel
does: their PSS, their pages after a kill -9, the files left behind."""
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

import pydedup
from pydedup import procfs, publish, shared

from shared_member import no_descriptor_left

MEMBER = pathlib.Path(__file__).with_name("shared_member.py")
MIB = 16


class Member:
    def __init__(self, name, seed=1, mib=MIB, env=None):
        self.proc = subprocess.Popen([sys.executable, str(MEMBER), name, str(seed), str(mib)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        hello = self.read()
        assert hello["ready"], hello
        self.store = hello["shared"]

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"member {self.pid} ended: {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def store_name():
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def members():
    started = []
    yield lambda *a, **k: started.append(Member(*a, **k)) or started[-1]
    for m in started:
        m.close()


def pss_of(pid):
    return procfs.process_pss(pid)


def test_two_processes_with_the_same_data_merge_and_their_pss_drops(store_name, members):
    a = members(store_name)
    b = members(store_name)
    for m in (a, b):
        m.ask("touch")
    before = pss_of(a.pid) + pss_of(b.pid)
    assert a.ask("merge")["merged"] == MIB * 256          # its unique pages become frames
    assert b.ask("merge")["frames_new"] == 0              # b's pages all find a's frames
    for m in (a, b):
        m.ask("touch")
    after = pss_of(a.pid) + pss_of(b.pid)
    # One copy of the data less, give or take a few pages of bookkeeping.
    assert before - after > 0.8 * MIB * 2**20, (before, after)
    s = b.ask("stats")
    assert s["members"][0] == b.pid and a.pid in s["members"]
    assert s["shared_pages"] == MIB * 256
    # Each frame is divided among the mappings of it: both arenas, and the
    # windows (views) through which each core compared it.
    assert s["rss"] == MIB * 2**20 and 0 < s["pss"] <= MIB * 2**19
    for m in (a, b):
        assert m.ask("check")["checked"]
        assert m.ask("verify")["equal"]


def test_writes_stay_private(store_name, members):
    a = members(store_name)
    b = members(store_name)
    a.ask("merge")
    b.ask("merge")
    assert a.ask("write 0 12345")["written"]
    assert a.ask("verify 0=12345")["equal"]
    assert b.ask("verify")["equal"]
    b.ask("merge")
    a.ask("merge")
    assert b.ask("verify")["equal"] and a.ask("verify 0=12345")["equal"]
    assert a.ask("check")["checked"] and b.ask("check")["checked"]


def test_the_background_scanner_merges_with_other_members(store_name, members):
    a = members(store_name)
    b = members(store_name)
    a.ask("merge")
    assert b.ask("scan")["shared_pages"] == MIB * 256
    assert b.ask("verify")["equal"] and b.ask("check")["checked"]
    assert a.ask("check")["checked"]


def test_different_data_is_not_shared(store_name, members):
    a = members(store_name, seed=1)
    b = members(store_name, seed=2)
    a.ask("merge")
    b.ask("merge")
    assert b.ask("stats")["shared_pages"] == 0
    assert a.ask("verify")["equal"] and b.ask("verify")["equal"]


def test_the_environment_names_the_store(store_name, members):
    a = members(store_name)
    b = members("-", env={"PYDEDUP_SHARED": store_name})
    assert b.store == store_name
    a.ask("merge")
    assert b.ask("merge")["frames_new"] == 0
    assert set(b.ask("stats")["members"]) == {a.pid, b.pid}


def test_a_member_killed_outside_a_merge_loses_the_others_nothing(store_name, members):
    a = members(store_name)
    b = members(store_name)
    a.ask("merge")
    b.ask("merge")
    b.kill()
    s = a.ask("stats")
    assert s["members"] == [a.pid] and s["lost"] == 1
    assert a.ask("verify")["equal"] and a.ask("check")["checked"]
    c = members(store_name)                              # the server changed: still found
    assert c.ask("merge")["frames_new"] == 0
    assert c.ask("verify")["equal"] and c.ask("check")["checked"]


def test_when_the_serving_member_dies_another_serves_the_store(store_name, members):
    a = members(store_name)             # the first: it serves the socket
    b = members(store_name)
    a.ask("merge")
    b.ask("merge")
    a.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # b sees a's connection close and binds the name
        c = members(store_name)
        if b.pid in c.ask("stats")["members"]:
            break
        c.close()
    assert c.ask("merge")["frames_new"] == 0          # b's frames (a's data, kept)
    assert set(c.ask("stats")["members"]) == {b.pid, c.pid}
    assert b.ask("verify")["equal"] and c.ask("check")["checked"]


def test_a_member_killed_inside_merges_leaves_no_lock_held(store_name, members):
    a = members(store_name)
    a.ask("merge")
    kills = 4
    for _ in range(kills):
        b = members(store_name)
        b.send("loop")                  # merges without end, the lock held most of the time
        time.sleep(0.2 + random.random() * 0.3)
        b.kill()
        assert a.ask("merge")["merged"] >= 0            # returns: the lock was not left held
        assert a.ask("verify")["equal"]
        assert a.ask("check")["checked"]
    s = a.ask("stats")
    assert s["members"] == [a.pid] and s["lost"] == kills
    assert s["repairs"] >= 1            # a kill landed with the lock held, and was repaired
    c = members(store_name)
    assert c.ask("merge")["frames_new"] == 0
    assert c.ask("check")["checked"] and c.ask("verify")["equal"]


def _files_in(*dirs):
    return {str(p) for d in dirs for p in pathlib.Path(d).iterdir()
            if pathlib.Path(d).is_dir()}


def test_nothing_is_left_behind_and_the_next_member_starts_clean(store_name, members):
    dirs = [d for d in ("/dev/shm", "/tmp") if os.path.isdir(d)]
    before = _files_in(*dirs)
    a = members(store_name)
    b = members(store_name)
    a.ask("merge")
    b.ask("merge")
    a.kill()
    b.kill()
    assert {f for f in _files_in(*dirs) - before if "pydedup" in f} == set()
    c = members(store_name, seed=3)
    s = c.ask("stats")
    assert s["members"] == [c.pid] and s["frames"] == 0 and s["lost"] == 0
    killed = (f"{a.pid}-", f"{b.pid}-")     # their counters' files: c's stats() removed them
    assert [f for f in os.listdir(publish.directory()) if f.startswith(killed)] == []


def test_a_process_that_left_the_store_serves_it_no_more(store_name, members):
    """The first member serves the store; once its arena and arrays are gone
    it lets the store go though it lives on, so that a process that starts
    after every member died starts a clean store."""
    a = members(store_name, seed=1)
    b = members(store_name, seed=2)
    a.ask("merge")
    b.ask("merge")
    assert a.ask("leave")["memfds"] == []
    assert b.ask("stats")["members"] == [b.pid]
    b.kill()
    c = members(store_name, seed=3)
    s = c.ask("stats")
    assert s["members"] == [c.pid] and s["frames"] == 0 and s["lost"] == 0


def test_a_forked_child_of_a_member_is_a_member(store_name, members):
    a = members(store_name)
    b = members(store_name)
    a.ask("merge")
    b.ask("merge")
    assert b.ask("fork")["child"] == 0
    assert b.ask("verify")["equal"] and b.ask("check")["checked"]
    s = b.ask("stats")
    assert sorted(s["members"]) == sorted([a.pid, b.pid])   # the child left when it ended
    assert a.ask("check")["checked"]


def test_a_member_without_file_descriptors_takes_no_other_for_dead(store_name, members):
    """Its sweep cannot open /proc/PID/stat: that says nothing of PID."""
    a = members(store_name, seed=1)
    a.ask("merge")
    b = members(store_name, seed=2)
    assert b.ask("nofds")["error"] == errno.EMFILE
    assert b.ask("merge")["merged"] >= 0
    assert a.ask("verify")["equal"] and a.ask("check")["checked"]
    s = a.ask("stats")
    assert s["lost"] == 0 and sorted(s["members"]) == sorted([a.pid, b.pid])


def test_a_child_keeps_its_pages_when_its_parent_exits_at_once(store_name, members, tmp_path):
    """The daemon idiom: fork, and the parent exits. Another member sweeps
    before the child has taken the slot its parent kept for it (its
    pydedup hook waits 0.5 s here): the fork lock keeps the slot."""
    a = members(store_name, seed=1, env={"SLOW_CHILD": "0.5"})
    a.ask("merge")
    b = members(store_name, seed=2)
    out = tmp_path / "child.json"
    a.ask(f"orphan {out} 1.0")
    a.proc.wait(10)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:  # sweeps, while the child's slot is still reserved
        assert b.ask("merge")["merged"] >= 0
    while not out.exists() or not out.stat().st_size:
        time.sleep(0.05)
    assert json.loads(out.read_text()) == {"equal": True}
    assert b.ask("check")["checked"]


def test_a_child_without_a_slot_copies_its_pages_before_the_parent_frees_them(store_name,
                                                                              members):
    a = members(store_name, seed=1)
    a.ask("merge")
    a.ask("fill 63")                    # every slot of MAX_MEMBERS (64) is taken
    assert a.ask("fork-free")["child"] == 0
    assert len(a.ask("unfill")["members"]) == 1
    assert a.ask("verify")["equal"] and a.ask("check")["checked"]


def test_a_signal_while_a_parent_waits_for_its_child_without_a_slot(store_name, members):
    """The alarm's handler raises while the parent waits for the child to
    copy (the child's hook is late by 1 s here): the parent still waits,
    and its arena's lock is let go after."""
    a = members(store_name, seed=1, env={"SLOW_CHILD": "1.0"})
    a.ask("merge")
    a.ask("fill 63")
    forked = a.ask("fork-signal 0.3")
    assert forked["waited"] >= 1.0 and forked["merged"]
    a.ask("unfill")
    assert a.ask("verify")["equal"] and a.ask("check")["checked"]


def test_a_child_that_execs_leaves_the_store(store_name, members):
    """Its pid and start time stay, but its pages are gone with the exec:
    the stack's new address tells."""
    a = members(store_name, seed=1)
    a.ask("merge")
    child = a.ask(f"fork-exec {shutil.which('sleep')} 30")["child"]
    try:
        deadline = time.monotonic() + 10
        while (s := a.ask("stats"))["lost"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)            # the child's hook makes it a member; then it execs
        assert s["members"] == [a.pid] and s["lost"] == 1
        assert a.ask("check")["checked"] and a.ask("verify")["equal"]
    finally:
        os.kill(child, signal.SIGKILL)


def test_frames_a_first_member_cannot_write_are_not_shared(store_name, members):
    """A first member's new frames are written behind, a run at once; when
    the frame store stops taking them (RLIMIT_FSIZE here, a full memory
    cgroup in life), the pages whose frames were not written keep their own
    memory, said in the report, and no other member finds those frames."""
    pages = 256
    a = members(store_name, seed=5, mib=1)
    a.ask("limit 40")
    first = a.ask("merge")
    a.ask("unlimit")
    assert (first["frames_new"], first["merged"], first["no_memory"]) == (40, 40, pages - 40)
    assert a.ask("check")["checked"]            # no frame without memory, none leaked
    assert a.ask("stats")["frames"] == 40
    b = members(store_name, seed=5, mib=1)
    joined = b.ask("merge")
    assert joined["merged"] == pages and joined["frames_new"] == pages - 40
    assert a.ask("merge")["merged"] == pages - 40
    for m in (a, b):
        assert m.ask("check")["checked"] and m.ask("verify")["equal"]
        assert m.ask("stats")["shared_pages"] == pages


def test_in_process_arena_on_a_store(store_name):
    arena = pydedup.Arena(size=1 << 28, shared=store_name)
    x = arena.full(4096 * 64, 3.0)
    y = arena.array(x)
    arena.merge()
    arena._live().check_invariants()
    s = arena.stats()
    assert s.shared_store == store_name and s.shared_members == [os.getpid()]
    assert s.shared_pages == 0           # no other process maps its frames
    y[0] = 1.0
    assert x[0] == 3.0
    with pytest.raises(ValueError, match="one arena per store"):
        pydedup.Arena(size=1 << 28, shared=store_name)
    with pytest.raises(ValueError, match="set when the arena is made"):
        arena.shared = "other"
    arena.close()


def test_the_command_line_shows_the_store_and_its_members(store_name, members, tmp_path,
                                                         monkeypatch, capsys):
    from pydedup.__main__ import main
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    other = members(store_name)
    arena = pydedup.Arena(size=1 << 28, shared=store_name)
    arena.stats()
    assert main(["stats", str(os.getpid()), "--wait", "0"]) == 0
    out = capsys.readouterr().out
    assert f"shared store {store_name!r}, members (pids): {os.getpid()}, {other.pid}" in out
    arena.close()


def test_the_server_takes_members_whose_connections_are_above_descriptor_1023(store_name,
                                                                             members):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}: no descriptor above 1,023 to use")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1100:   # the connections accepted land above
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        arena = pydedup.Arena(size=1 << 28, shared=store_name)      # serves the store
        joined = [members(store_name, seed=1) for _ in range(3)]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [m.store for m in joined] == [store_name] * 3
    assert sorted(arena.stats().shared_members) == sorted([os.getpid()] + [m.pid for m in joined])
    arena.close()


def test_the_server_serves_on_after_its_process_ran_out_of_descriptors(store_name, members):
    """accept() fails at once while the server's process has no descriptor
    free (the one accept() it was waiting in had reserved one, which the
    first joiner gets); the server must wait, not stop, for the next."""
    server = members(store_name, seed=1)
    server.send("nofds-for 1.0")
    assert server.read()["filled"] > 0
    arena = pydedup.Arena(size=1 << 28, shared=store_name)
    assert server.read()["freed"]
    later = members(store_name, seed=2)
    assert arena.shared == store_name and later.store == store_name
    assert sorted(server.ask("stats")["members"]) == sorted([server.pid, os.getpid(), later.pid])
    arena.close()


def test_a_joiner_without_descriptors_for_the_memfds_is_told_so(store_name, members):
    """An OSError the arena turns into a warning and a store of its own, not
    a SharedStoreError that the store is not pydedup's."""
    members(store_name)
    with no_descriptor_left() as fillers:
        for fd in fillers[-2:]:         # one for the socket, one of the two memfds
            os.close(fd)
        del fillers[-2:]
        with pytest.raises(OSError, match="no file descriptor left") as raised:
            shared._connect(store_name)
    assert raised.value.errno == errno.EMFILE and not isinstance(raised.value,
                                                                 shared.SharedStoreError)


def test_a_bad_name_is_refused():
    with pytest.raises(ValueError, match="knob shared"):
        pydedup.Arena(size=1 << 28, shared="no/slashes")


@pytest.fixture
def store_memfds():
    """The memfds of a new, empty shared store, made here: (records, frames);
    closed after the test."""
    from pydedup._fast import Core
    records = os.memfd_create("records")
    Core.format_shared(records)
    frames = [os.memfd_create("frames") for _ in range(Core.frame_stripes())]
    yield records, list(frames)
    for fd in [records, *frames]:
        os.close(fd)


def test_a_store_whose_frames_cannot_be_mapped_leaves_no_descriptor_behind(store_memfds):
    """The core takes copies of a store's memfds; when one cannot be sized
    or mapped (here a pipe in a memfd's place), it closes them all, the
    later ones too."""
    from pydedup._fast import Core
    records, frames = store_memfds
    read, write = os.pipe()
    frames[1] = read
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="cannot open the shared frame store"):
        Core(1 << 16, (records, tuple(frames)))
    assert sorted(os.listdir("/proc/self/fd")) == before
    os.close(read)
    os.close(write)


def test_frames_memfds_of_another_layout_are_refused_and_never_cut(store_memfds):
    """Memfds longer than this pydedup's frame store makes them (a layout
    of another version) are not a store the core opens, and it leaves their
    length as it was: another member may map all of it."""
    from pydedup._fast import Core
    records, frames = store_memfds
    length = Core.shared_slots() * os.sysconf("SC_PAGE_SIZE")     # one page a slot
    for fd in frames:
        os.ftruncate(fd, length)
    with pytest.raises(OSError, match="cannot open the shared frame store") as raised:
        Core(1 << 16, (records, tuple(frames)))
    assert raised.value.errno == errno.EINVAL
    assert [os.fstat(fd).st_size for fd in frames] == [length] * len(frames)


def test_a_store_served_by_another_version_is_refused_by_name(store_name):
    """A server of an older pydedup (protocol 1: one frames memfd) is not
    taken for something that is not pydedup's."""
    import socket
    import threading
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    server.bind(shared.address(store_name))
    server.listen()
    records, frames = os.memfd_create("records"), os.memfd_create("frames")

    def serve():
        conn, _ = server.accept()
        socket.send_fds(conn, [b"pydedup-store 1 %d" % os.getpid()], [records, frames])
        conn.recv(1)                    # until the client has gone
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(shared.SharedStoreError, match=r"another version of pydedup "
                                                          r"\(protocol 1, this one speaks 2\)"):
            pydedup.Arena(size=1 << 28, shared=store_name)
    finally:
        thread.join(10)
        server.close()
        os.close(records)
        os.close(frames)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as uid 65534")
def test_another_user_cannot_join(store_name):
    import socket
    import traceback
    arena = pydedup.Arena(size=1 << 28, shared=store_name)
    arena.merge()
    roots = arena._store.identity()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            # Straight to root's socket: refused, and given no memfd.
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(shared.address(store_name, uid=0))
            answer, fds, _, _ = socket.recv_fds(sock, 256, 2)
            # By name: a store of its own (the uid is in the socket's name).
            own = shared._find_or_make(store_name)
            result = [answer.decode(), len(fds), own.identity() != roots]
        except BaseException:
            result = [traceback.format_exc(), -1, False]
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    answer, nfds, own_store = json.loads(os.read(read, 65536))
    assert answer.startswith("pydedup-refused") and nfds == 0, answer
    assert own_store
    assert arena.stats().shared_members == [os.getpid()]
    arena.close()
