"""Listening sockets: TCP (IPv4 or IPv6), or a Unix domain socket (``unix:PATH``).

A Unix socket's file is replaced when it is stale (left by a server that is gone: nothing
accepts on it), and refused when a server still accepts on it or when it is not a socket.
Whoever binds it removes it when serving stops, unless another server has replaced it
meanwhile (a rolling restart).

libevent 2.1's evhttp names each new peer with getnameinfo() and ends the whole process
when that fails (libevent issue #1615).  glibc names a Unix-socket peer ("localhost");
other C libraries (macOS, musl) refuse the family, so there a Unix socket is refused up
front instead of the server exiting at its first connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import stat
import struct
import sys

from .config import ServerConfig

UNIX_PREFIX = "unix:"
# What the environ shows for a Unix-socket peer, a process on this machine: REMOTE_ADDR
# (it is a trusted proxy when 127.0.0.1 is in COMET_TRUSTED_PROXIES), and SERVER_NAME.
UNIX_PEER = ("127.0.0.1", 0)
UNIX_SERVER = ("localhost", 0)


def unix_path(address: str) -> str | None:
    """The path of a ``unix:PATH`` address, else None."""
    if address.startswith(UNIX_PREFIX):
        return address[len(UNIX_PREFIX) :]
    return None


def listen_socket(config: ServerConfig) -> socket.socket:
    """The listening socket ``config`` names: a Unix socket, or TCP host and port."""
    if config.unix_socket:
        return bind_unix_socket(config.unix_socket, config.backlog)
    return bind_socket(config.host, config.port, config.backlog, ipv6=config.ipv6)


def bind_socket(host: str, port: int, backlog: int = 1024, *, ipv6: bool = False) -> socket.socket:
    """A listening TCP socket; IPv6 when asked or when ``host`` is an IPv6 literal."""
    family = socket.AF_INET6 if ipv6 or ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix_socket(path: str, backlog: int = 1024) -> socket.socket:
    """A listening Unix socket at ``path``, open to every user who may reach it: the
    directory's permissions decide who may connect (connecting needs write permission
    on the socket file, which the umask would give its owner only, so that a proxy of
    another user's got "permission denied"), as with a port on loopback."""
    if not path:
        raise OSError(errno.EINVAL, "a Unix socket needs a path")
    if not unix_peers_supported():
        raise OSError(
            errno.EAFNOSUPPORT,
            "Unix sockets need glibc here: libevent 2.1 would exit at the first "
            "connection, because this C library cannot name a Unix-socket peer",
        )
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_socket_id(path: str) -> tuple[int, int] | None:
    """The device and inode of the socket file at ``path``, if it is one."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    return (info.st_dev, info.st_ino)


def remove_unix_socket(
    path: str, file_id: tuple[int, int] | None, still_listening: bool = False
) -> None:
    """Remove the socket file a stopped server bound (``file_id`` from ``unix_socket_id``
    after binding), unless a successor has bound the path since.  A successor's file
    may have been given the same inode (a file system reuses one just freed), so one
    that is listening is left alone: ours no longer does, unless ``still_listening``
    (a process exiting with its server still up: no successor can bind the path while
    it listens).  (Not the change time: a chmod, as for a proxy's access, changes it.)"""
    if file_id is None or unix_socket_id(path) != file_id:
        return
    with contextlib.suppress(OSError):  # gone, or not ours to probe: leave it
        if still_listening or not _listened_on(path):
            os.unlink(path)


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "it exists and is not a socket")
    if _listened_on(path):
        raise OSError(errno.EADDRINUSE, "a server is listening on it")
    os.unlink(path)  # left by a server that is gone


def _listened_on(path: str) -> bool:
    """Whether a server listens on the socket file at ``path`` (a connection is accepted,
    or waits in a full backlog) rather than refusing (a file left behind)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except (TimeoutError, BlockingIOError):  # its backlog is full: it is there, and busy
        return True
    finally:
        probe.close()
    return True


@functools.cache
def unix_peers_supported() -> bool:
    """Whether the C library's getnameinfo() names an unnamed Unix-socket peer, which is
    what evhttp asks of it for every connection."""
    if not hasattr(socket, "AF_UNIX"):
        return False
    if sys.platform.startswith("linux"):
        family = struct.pack("=H", socket.AF_UNIX)  # sa_family_t
    else:
        family = struct.pack("BB", 2, socket.AF_UNIX)  # BSD layout: sa_len, sa_family
    peer = ctypes.create_string_buffer(family + bytes(110))
    host = ctypes.create_string_buffer(1025)
    service = ctypes.create_string_buffer(32)
    getnameinfo = ctypes.CDLL(None).getnameinfo
    getnameinfo.restype = ctypes.c_int
    getnameinfo.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.c_int,
    ]
    flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    # accept() reports an unnamed peer (a client that did not bind) with just its family.
    result = getnameinfo(peer, len(family), host, len(host), service, len(service), flags)
    return bool(result == 0)
