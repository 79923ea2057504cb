"""Where the processes of one user find a shared frame store (issue 16).

A store is a few memfds: its frames (Core.frame_stripes() of them, written
side by side: pydedup/_frames.pxi), and its records (the frame table, the
stable tree, one ledger a member, the lock: pydedup/_shared.pxi). They are
never named in a file system: a member passes them to the next over an
abstract unix socket, ``\\0pydedup.<uid>.<name>``, with SCM_RIGHTS, so they
vanish with their last holder, even if every member was killed.

- The first process to name a store makes it and serves the socket from a
  thread. Every other member connects, checks who serves (SO_PEERCRED:
  the same user, in the same pid namespace) and receives the memfds; the
  server checks the same of the client and refuses anyone else.
- Every member keeps its connection open. When the server dies, the others
  see the connection close and one of them binds the name again, so a
  process that starts later still joins the living members. A process that
  starts after all of them died finds no one and makes a new, empty store.
- The uid is part of the name, so another user naming the same store gets
  one of their own; a process of another user that connects to this one's
  socket anyway is refused (and told so).
- A server that does not answer in CONNECT_SECONDS (a stopped process, or
  not pydedup's) leaves the arena with a store of its own, and a warning.
- A process serves, and holds the memfds, while it is a member: when its
  arena's pages go (the Core leaves the store), the store's thread stops
  serving and closes them, so that a process that starts after every
  member died finds no one, even if this one still runs.
"""
from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import threading
import time
import weakref

from pydedup._fast import Core

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PROTOCOL = b"pydedup-store "
_VERSION = 2                    # 2: the frames in Core.frame_stripes() memfds
_HELLO = _PROTOCOL + b"%d " % _VERSION  # then the server's pid, as it sees it
_MEMFDS = 1 + Core.frame_stripes()  # a store's: records, then frames
CONNECT_SECONDS = 10.0          # to wait for a store's server to answer
_REFUSED = b"pydedup-refused "
# accept() failures that pass: short of descriptors or memory for a while
# (the connection stays queued), or a client that went before it was taken.
_PASSING = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


class SharedStoreError(OSError):
    """A shared store could not be joined (another user's, a refused peer)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a shared store's name is 1 to 64 letters, digits, '.', '_' or '-', "
                         f"not {name!r}")
    return name


def address(name: str, uid: int | None = None) -> bytes:
    """The abstract socket address of store `name` of user `uid`."""
    return f"\0pydedup.{os.getuid() if uid is None else uid}.{name}".encode()


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel says."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


class Store:
    """This process's handle on a shared store: its memfds, and the
    socket through which it serves them or is connected to the server."""

    def __init__(self, name: str, records: int, frames: tuple[int, ...]):
        self.name = name
        self.records, self.frames = records, frames     # memfds this object owns
        self.serving = False
        self._sock: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._conn: socket.socket | None = None         # to the server, while watching
        self._stop = False
        self._orphaned = False          # this process's member went; join() may take it again

    @property
    def fds(self) -> tuple[int, tuple[int, ...]]:
        """(records, frames): the memfds, as Core takes them."""
        return self.records, self.frames

    def _memfds(self) -> list[int]:
        return [self.records, *self.frames]

    def identity(self) -> int:
        """The records memfd's inode: two handles name the same store iff equal."""
        return os.fstat(self.records).st_ino

    # -- serving -----------------------------------------------------------

    def _try_serve(self) -> bool:
        """Bind the name and serve from a thread; False if someone else has it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address(self.name))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                return False
            raise
        sock.listen(64)
        self._sock, self.serving = sock, True
        return True

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop:
            if self._orphaned and self._leave_if_unused():
                return                  # orphaned before the socket was there to wake
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if e.errno in _PASSING and not self._stop and not self._orphaned:
                    time.sleep(0.05)    # the connection waits in the queue meanwhile
                    continue
                if self._orphaned and not self._leave_if_unused():
                    sock.close()        # taken again meanwhile: serve or watch anew
                    self._sock, self.serving = None, False
                    _rejoin(self)
                return
            pid, uid, _ = _peer(conn)
            try:
                if uid != os.getuid():
                    conn.sendall(_REFUSED + b"another user's store")
                    conn.close()
                    continue
                socket.send_fds(conn, [_HELLO + str(os.getpid()).encode()], self._memfds())
            except OSError:
                conn.close()
                continue
            self._clients = self._living_clients() + [conn]

    def _living_clients(self) -> list[socket.socket]:
        """The connections of members still alive: a member's end closes with
        its process (members never send), so a readable one has gone. poll,
        not select, which cannot take a descriptor above 1,023."""
        poller = select.poll()
        for conn in self._clients:
            poller.register(conn, select.POLLIN)
        gone = {fd for fd, _ in poller.poll(0)}
        for conn in self._clients:
            if conn.fileno() in gone:
                conn.close()
        return [c for c in self._clients if c.fileno() >= 0]

    # -- watching the server -------------------------------------------------

    def _watch(self, conn: socket.socket) -> None:
        """Wait for the server to go; then serve the name, or connect to
        whoever does now, so later processes still find the members."""
        while not self._stop:
            self._conn = conn
            if self._orphaned and self._leave_if_unused():
                conn.close()            # orphaned before the connection was there to wake
                return
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            self._conn = None
            conn.close()
            if self._stop or (self._orphaned and self._leave_if_unused()):
                return
            for _ in range(100):
                if self._try_serve():
                    assert self._sock is not None
                    self._serve(self._sock)
                    return
                try:
                    conn, fds, _ = _connect(self.name)
                except OSError:         # no one serves yet, or its server just went
                    time.sleep(0.01)
                    continue
                _close(fds)
                break
            else:
                return

    def _start(self, target, arg) -> None:
        self._thread = threading.Thread(target=target, args=(arg,), daemon=True,
                                        name=f"pydedup-store-{self.name}")
        self._thread.start()

    # -- leaving -------------------------------------------------------------

    def orphan(self) -> None:
        """This process's member is gone (its pages' finalizer: garbage
        collection, which must not wait for a lock): wake the thread, which
        leaves the store unless an arena took it again meanwhile."""
        self._orphaned = True
        for sock in (self._sock, self._conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)     # accept() or recv() returns
                except OSError:
                    pass

    def _leave_if_unused(self) -> bool:
        """On the store's thread, once woken: stop serving and close the
        memfds, unless join() took the store again (True if left)."""
        with _lock:
            if not self._orphaned:
                return False
            if _STORES.get(self.name) is self:
                del _STORES[self.name]
            self._stop = True
            self._close_sockets()
            _close(self._memfds())
            self.records, self.frames = -1, ()
            return True

    def forget_after_fork(self) -> None:
        """In a forked child: the sockets are the parent's; let them go (the
        child keeps the memfds; it is a member through its parent's slot)."""
        self._close_sockets()
        self._thread = None

    def _close_sockets(self) -> None:
        """Serve no more: the listening socket and the members' connections."""
        for sock in [self._sock, *self._clients]:
            if sock is not None:
                sock.close()
        self._sock, self._clients, self.serving = None, [], False


def _connect(name: str) -> tuple[socket.socket, list[int], int]:
    """Connect to the server of `name` and receive its memfds (records
    first); raises ConnectionRefusedError if no one serves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_SECONDS)    # a server that is stopped, or a squatter, never answers
    try:
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            try:
                sock.connect(address(name))
                break
            except BlockingIOError:     # its queue is full (a timeout makes connect not wait)
                if time.monotonic() > deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"shared store {name!r}: its server "
                                                        f"takes no one") from None
                time.sleep(0.01)
        pid, uid, _ = _peer(sock)
        if uid != os.getuid():
            raise SharedStoreError(errno.EPERM, f"the socket of shared store {name!r} is served "
                                                f"by uid {uid}, not this user: not joined")
        message, fds, flags, _ = socket.recv_fds(sock, 256, _MEMFDS)
        for fd in fds:                  # not for programs this process may exec
            os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:   # the kernel had no descriptor for them here
            _close(fds)
            raise OSError(errno.EMFILE, f"shared store {name!r}: no file descriptor left in "
                                        f"this process for its memfds")
        if message.startswith(_REFUSED):
            raise SharedStoreError(errno.EPERM, f"shared store {name!r} refused this process: "
                                                f"{message[len(_REFUSED):].decode()}")
        if message.startswith(_PROTOCOL) and not message.startswith(_HELLO):
            _close(fds)
            version = message[len(_PROTOCOL):].split(b" ")[0].decode(errors="replace")
            raise SharedStoreError(errno.EPROTO, f"shared store {name!r} is served by another "
                                                 f"version of pydedup (protocol {version}, this one "
                                                 f"speaks {_VERSION}): not joined")
        if not message.startswith(_HELLO) or len(fds) != _MEMFDS:
            _close(fds)
            raise SharedStoreError(errno.EPROTO, f"shared store {name!r}: not a pydedup store")
        if int(message[len(_HELLO):]) != pid:
            _close(fds)
            raise SharedStoreError(errno.EPERM, f"shared store {name!r} is served from another "
                                                f"pid namespace: not joined")
        sock.settimeout(None)           # from now on the connection only tells the server's end
        return sock, fds, os.fstat(fds[0]).st_ino
    except BaseException:
        sock.close()
        raise



def _new_memfds() -> tuple[int, tuple[int, ...]]:
    """The memfds of a new, empty store: (records, frames)."""
    fds: list[int] = []
    try:
        fds.append(os.memfd_create("pydedup-records", os.MFD_CLOEXEC))
        Core.format_shared(fds[0])
        for _ in range(Core.frame_stripes()):      # the core sizes them
            fds.append(os.memfd_create("pydedup-frames", os.MFD_CLOEXEC))
    except BaseException:
        _close(fds)
        raise
    return fds[0], tuple(fds[1:])


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)

_STORES: dict[str, Store] = {}
_IN_USE: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def join(name: str) -> Store:
    """This process's handle on store `name`: joined if a member serves it,
    else made (and served) here."""
    check_name(name)
    with _lock:
        store = _STORES.get(name)
        if store is not None:
            store._orphaned = False         # its thread, if woken, keeps it
            if store._thread is None:       # a forked child: watch again
                _rejoin(store)
            return store
        store = _find_or_make(name)
        _STORES[name] = store
        return store


def _rejoin(store: Store) -> None:
    try:
        conn, fds, _ = _connect(store.name)
    except OSError:
        if store._try_serve():
            store._start(store._serve, store._sock)
        return
    _close(fds)
    store._start(store._watch, conn)


def _find_or_make(name: str) -> Store:
    for _ in range(200):
        try:
            conn, (records, *frames), _ = _connect(name)
        except SharedStoreError:
            raise
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            pass                        # no one serves it, or its server is going
        else:
            store = Store(name, records, tuple(frames))
            store._start(store._watch, conn)
            return store
        store = Store(name, *_new_memfds())
        if store._try_serve():
            assert store._sock is not None
            store._start(store._serve, store._sock)
            return store
        _close(store._memfds())             # someone else made it first: join theirs
        time.sleep(0.005)
    raise SharedStoreError(errno.ETIMEDOUT, f"shared store {name!r}: its socket is bound but "
                                            f"no one serves it")


def claim(name: str, owner: object) -> None:
    """One arena per store in a process (a second would wait for the first's
    lock in the same thread): raise if a live arena of this process holds it."""
    with _lock:
        if _IN_USE.get(name) is not None:
            raise ValueError(f"this process has an arena on shared store {name!r} already; "
                             f"a process holds one arena per store")
        _IN_USE[name] = owner
        weakref.finalize(owner, _STORES[name].orphan)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()            # another thread may have held it at the fork
    for store in _STORES.values():
        store.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
