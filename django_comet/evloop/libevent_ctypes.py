"""ctypes binding to libevent 2.1: library loading, prototypes and callback types only.

No logic lives here.  Every function the project calls is declared with its C prototype
in a comment, its ``argtypes`` and its ``restype``; opaque C structs are ``c_void_p``
aliases.  Callers keep every ``CFUNCTYPE`` object referenced for as long as C may call it.

The library is found, in order, through the ``COMET_LIBEVENT`` environment variable (a
file name or path), the well-known sonames and ``ctypes.util.find_library``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_int64,
    c_long,
    c_short,
    c_size_t,
    c_ssize_t,
    c_uint16,
    c_void_p,
)

__all__ = ["EV_PERSIST", "EV_READ", "EV_TIMEOUT", "EV_WRITE", "LibeventMissing", "lib", "load"]

# Opaque handles.
evconnlistener_p = c_void_p
event_base_p = c_void_p
event_config_p = c_void_p
event_p = c_void_p
evhttp_p = c_void_p
evhttp_request_p = c_void_p
evhttp_connection_p = c_void_p
evhttp_bound_socket_p = c_void_p
evbuffer_p = c_void_p
evkeyvalq_p = c_void_p
bufferevent_p = c_void_p
evutil_socket_t = c_int
evbuffer_file_segment_p = c_void_p
# ev_off_t is 64 bits wide wherever libevent is built with a 64-bit off_t, as on every
# 64-bit platform; elsewhere it is left undeclared and files are sent by reading them.
ev_off_t = c_int64 if ctypes.sizeof(c_void_p) == 8 else None

# event.h
EV_TIMEOUT = 0x01
EV_READ = 0x02
EV_WRITE = 0x04
EV_PERSIST = 0x10
EVLOOP_ONCE = 0x01
EVLOOP_NONBLOCK = 0x02
EVLOOP_NO_EXIT_ON_EMPTY = 0x04
# enum event_base_config_flag
EVENT_BASE_FLAG_NO_CACHE_TIME = 0x08
EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST = 0x10
EVENT_BASE_FLAG_PRECISE_TIMER = 0x20

# http.h: enum evhttp_cmd_type
EVHTTP_METHODS = {
    1 << 0: "GET",
    1 << 1: "POST",
    1 << 2: "HEAD",
    1 << 3: "PUT",
    1 << 4: "DELETE",
    1 << 5: "OPTIONS",
    1 << 6: "TRACE",
    1 << 7: "CONNECT",
    1 << 8: "PATCH",
}
EVHTTP_ALL_METHODS = 0x1FF
EVHTTP_REQ_GET, EVHTTP_REQ_CONNECT = 1 << 0, 1 << 7
EVHTTP_PROXY_REQUEST = 0x0002  # struct evhttp_request's flags (event2/http_struct.h)
BEV_OPT_CLOSE_ON_FREE = 0x01
# buffer.h
EVBUFFER_FLAG_DRAINS_TO_FD = 1
EVBUF_FS_CLOSE_ON_FREE = 0x01
EVBUF_FS_DISABLE_LOCKING = 0x08


class timeval(Structure):
    _fields_ = [("tv_sec", c_long), ("tv_usec", c_long)]


class evkeyval(Structure):
    """struct evkeyval { TAILQ_ENTRY(evkeyval) next; char *key; char *value; }"""


evkeyval._fields_ = [
    ("tqe_next", POINTER(evkeyval)),
    ("tqe_prev", c_void_p),
    ("key", c_char_p),
    ("value", c_char_p),
]


class evbuffer_cb_info(Structure):
    _fields_ = [("orig_size", c_size_t), ("n_added", c_size_t), ("n_deleted", c_size_t)]


class evkeyvalq(Structure):
    """TAILQ_HEAD(evkeyvalq, evkeyval) { struct evkeyval *tqh_first; ... **tqh_last; }"""

    _fields_ = [("tqh_first", POINTER(evkeyval)), ("tqh_last", c_void_p)]


# typedef void (*event_callback_fn)(evutil_socket_t, short, void *);
event_callback_fn = CFUNCTYPE(None, evutil_socket_t, c_short, c_void_p)
# void (*cb)(struct evhttp_request *, void *)
evhttp_request_cb = CFUNCTYPE(None, evhttp_request_p, c_void_p)
# void (*cb)(struct evhttp_connection *, void *)
evhttp_connection_cb = CFUNCTYPE(None, evhttp_connection_p, c_void_p)
# struct bufferevent *(*cb)(struct event_base *, void *)  (evhttp_set_bevcb)
evhttp_bevcb = CFUNCTYPE(c_void_p, event_base_p, c_void_p)
# typedef void (*bufferevent_data_cb)(struct bufferevent *bev, void *ctx);
bufferevent_data_cb = CFUNCTYPE(None, bufferevent_p, c_void_p)
# typedef void (*evbuffer_cb_func)(struct evbuffer *buffer,
#     const struct evbuffer_cb_info *info, void *arg);
evbuffer_cb_func = CFUNCTYPE(None, evbuffer_p, POINTER(evbuffer_cb_info), c_void_p)
# typedef void (*evconnlistener_errorcb)(struct evconnlistener *, void *);
evconnlistener_errorcb = CFUNCTYPE(None, evconnlistener_p, c_void_p)

# name: (restype, argtypes); the C prototype is the comment above each entry.
_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    # struct event_config *event_config_new(void);
    "event_config_new": (event_config_p, []),
    # int event_config_set_flag(struct event_config *cfg, int flag);
    "event_config_set_flag": (c_int, [event_config_p, c_int]),
    # void event_config_free(struct event_config *cfg);
    "event_config_free": (None, [event_config_p]),
    # struct event_base *event_base_new(void);
    "event_base_new": (event_base_p, []),
    # struct event_base *event_base_new_with_config(const struct event_config *);
    "event_base_new_with_config": (event_base_p, [event_config_p]),
    # void event_base_free(struct event_base *);
    "event_base_free": (None, [event_base_p]),
    # int event_base_loop(struct event_base *, int flags);
    "event_base_loop": (c_int, [event_base_p, c_int]),
    # int event_base_loopbreak(struct event_base *);
    "event_base_loopbreak": (c_int, [event_base_p]),
    # const char *event_base_get_method(const struct event_base *);
    "event_base_get_method": (c_char_p, [event_base_p]),
    # const char *event_get_version(void);
    "event_get_version": (c_char_p, []),
    # struct event *event_new(struct event_base *, evutil_socket_t, short,
    #                         event_callback_fn, void *);
    "event_new": (event_p, [event_base_p, evutil_socket_t, c_short, event_callback_fn, c_void_p]),
    # void event_free(struct event *);
    "event_free": (None, [event_p]),
    # int event_add(struct event *ev, const struct timeval *timeout);
    "event_add": (c_int, [event_p, POINTER(timeval)]),
    # int event_del(struct event *);
    "event_del": (c_int, [event_p]),
    # void event_active(struct event *ev, int res, short ncalls);
    "event_active": (None, [event_p, c_int, c_short]),
    # struct evhttp *evhttp_new(struct event_base *base);
    "evhttp_new": (evhttp_p, [event_base_p]),
    # void evhttp_free(struct evhttp* http);
    "evhttp_free": (None, [evhttp_p]),
    # struct evhttp_bound_socket *evhttp_accept_socket_with_handle(struct evhttp *,
    #                                                              evutil_socket_t);
    "evhttp_accept_socket_with_handle": (evhttp_bound_socket_p, [evhttp_p, evutil_socket_t]),
    # void evhttp_del_accept_socket(struct evhttp *, struct evhttp_bound_socket *);
    "evhttp_del_accept_socket": (None, [evhttp_p, evhttp_bound_socket_p]),
    # struct evconnlistener *evhttp_bound_socket_get_listener(struct evhttp_bound_socket *);
    "evhttp_bound_socket_get_listener": (evconnlistener_p, [evhttp_bound_socket_p]),
    # void evconnlistener_set_error_cb(struct evconnlistener *lev,
    #                                  evconnlistener_errorcb errorcb);
    "evconnlistener_set_error_cb": (None, [evconnlistener_p, evconnlistener_errorcb]),
    # int evconnlistener_disable(struct evconnlistener *lev);
    "evconnlistener_disable": (c_int, [evconnlistener_p]),
    # int evconnlistener_enable(struct evconnlistener *lev);
    "evconnlistener_enable": (c_int, [evconnlistener_p]),
    # void evhttp_set_gencb(struct evhttp *, void (*)(struct evhttp_request *, void *), void *);
    "evhttp_set_gencb": (None, [evhttp_p, evhttp_request_cb, c_void_p]),
    # void evhttp_set_timeout_tv(struct evhttp *http, const struct timeval* tv);
    "evhttp_set_timeout_tv": (None, [evhttp_p, POINTER(timeval)]),
    # void evhttp_set_max_headers_size(struct evhttp* http, ev_ssize_t max_headers_size);
    "evhttp_set_max_headers_size": (None, [evhttp_p, c_ssize_t]),
    # void evhttp_set_max_body_size(struct evhttp* http, ev_ssize_t max_body_size);
    "evhttp_set_max_body_size": (None, [evhttp_p, c_ssize_t]),
    # void evhttp_set_allowed_methods(struct evhttp* http, ev_uint16_t methods);
    "evhttp_set_allowed_methods": (None, [evhttp_p, c_uint16]),
    # void evhttp_set_default_content_type(struct evhttp *http, const char *content_type);
    "evhttp_set_default_content_type": (None, [evhttp_p, c_char_p]),
    # int evhttp_set_flags(struct evhttp *http, int flags);
    "evhttp_set_flags": (c_int, [evhttp_p, c_int]),
    # const char *evhttp_request_get_uri(const struct evhttp_request *req);
    "evhttp_request_get_uri": (c_char_p, [evhttp_request_p]),
    # enum evhttp_cmd_type evhttp_request_get_command(const struct evhttp_request *req);
    "evhttp_request_get_command": (c_int, [evhttp_request_p]),
    # struct evkeyvalq *evhttp_request_get_input_headers(struct evhttp_request *req);
    "evhttp_request_get_input_headers": (POINTER(evkeyvalq), [evhttp_request_p]),
    # struct evkeyvalq *evhttp_request_get_output_headers(struct evhttp_request *req);
    "evhttp_request_get_output_headers": (evkeyvalq_p, [evhttp_request_p]),
    # struct evbuffer *evhttp_request_get_input_buffer(struct evhttp_request *req);
    "evhttp_request_get_input_buffer": (evbuffer_p, [evhttp_request_p]),
    # void evhttp_request_set_on_complete_cb(struct evhttp_request *req,
    #     void (*cb)(struct evhttp_request *, void *), void *cb_arg);
    "evhttp_request_set_on_complete_cb": (None, [evhttp_request_p, evhttp_request_cb, c_void_p]),
    # struct evhttp_connection *evhttp_request_get_connection(struct evhttp_request *req);
    "evhttp_request_get_connection": (evhttp_connection_p, [evhttp_request_p]),
    # void evhttp_connection_set_closecb(struct evhttp_connection *,
    #     void (*)(struct evhttp_connection *, void *), void *);
    "evhttp_connection_set_closecb": (None, [evhttp_connection_p, evhttp_connection_cb, c_void_p]),
    # struct bufferevent* evhttp_connection_get_bufferevent(struct evhttp_connection *evcon);
    "evhttp_connection_get_bufferevent": (bufferevent_p, [evhttp_connection_p]),
    # evutil_socket_t bufferevent_getfd(struct bufferevent *bufev);
    "bufferevent_getfd": (evutil_socket_t, [bufferevent_p]),
    # void evhttp_set_bevcb(struct evhttp *http,
    #     struct bufferevent *(*cb)(struct event_base *, void *), void *arg);
    "evhttp_set_bevcb": (None, [evhttp_p, evhttp_bevcb, c_void_p]),
    # struct bufferevent *bufferevent_socket_new(struct event_base *base,
    #                                            evutil_socket_t fd, int options);
    "bufferevent_socket_new": (bufferevent_p, [event_base_p, evutil_socket_t, c_int]),
    # void bufferevent_setcb(struct bufferevent *bufev, bufferevent_data_cb readcb,
    #     bufferevent_data_cb writecb, bufferevent_event_cb eventcb, void *cbarg);
    "bufferevent_setcb": (None, [bufferevent_p, bufferevent_data_cb, c_void_p, c_void_p, c_void_p]),
    # void bufferevent_free(struct bufferevent *bufev);
    "bufferevent_free": (None, [bufferevent_p]),
    # void bufferevent_incref(struct bufferevent *bufev);
    "bufferevent_incref": (None, [bufferevent_p]),
    # int bufferevent_decref(struct bufferevent *bufev);
    "bufferevent_decref": (c_int, [bufferevent_p]),
    # struct evbuffer *bufferevent_get_input(struct bufferevent *bufev);
    "bufferevent_get_input": (evbuffer_p, [bufferevent_p]),
    # struct evbuffer *bufferevent_get_output(struct bufferevent *bufev);
    "bufferevent_get_output": (evbuffer_p, [bufferevent_p]),
    # int bufferevent_write(struct bufferevent *bufev, const void *data, size_t size);
    "bufferevent_write": (c_int, [bufferevent_p, c_char_p, c_size_t]),
    # int bufferevent_enable(struct bufferevent *bufev, short event);
    "bufferevent_enable": (c_int, [bufferevent_p, c_short]),
    # int bufferevent_disable(struct bufferevent *bufev, short event);
    "bufferevent_disable": (c_int, [bufferevent_p, c_short]),
    # int bufferevent_set_timeouts(struct bufferevent *bufev,
    #     const struct timeval *timeout_read, const struct timeval *timeout_write);
    "bufferevent_set_timeouts": (c_int, [bufferevent_p, POINTER(timeval), POINTER(timeval)]),
    # void bufferevent_setwatermark(struct bufferevent *bufev, short events,
    #     size_t lowmark, size_t highmark);
    "bufferevent_setwatermark": (None, [bufferevent_p, c_short, c_size_t, c_size_t]),
    # int evhttp_add_header(struct evkeyvalq *headers, const char *key, const char *value);
    "evhttp_add_header": (c_int, [evkeyvalq_p, c_char_p, c_char_p]),
    # void evhttp_clear_headers(struct evkeyvalq *headers);
    "evhttp_clear_headers": (None, [evkeyvalq_p]),
    # const char *evhttp_find_header(const struct evkeyvalq *headers, const char *key);
    "evhttp_find_header": (c_char_p, [evkeyvalq_p, c_char_p]),
    # int evhttp_remove_header(struct evkeyvalq *headers, const char *key);
    "evhttp_remove_header": (c_int, [evkeyvalq_p, c_char_p]),
    # void evhttp_send_error(struct evhttp_request *req, int error, const char *reason);
    "evhttp_send_error": (None, [evhttp_request_p, c_int, c_char_p]),
    # void evhttp_send_reply(struct evhttp_request *req, int code, const char *reason,
    #                        struct evbuffer *databuf);
    "evhttp_send_reply": (None, [evhttp_request_p, c_int, c_char_p, evbuffer_p]),
    # void evhttp_send_reply_start(struct evhttp_request *req, int code, const char *reason);
    "evhttp_send_reply_start": (None, [evhttp_request_p, c_int, c_char_p]),
    # void evhttp_send_reply_chunk(struct evhttp_request *req, struct evbuffer *databuf);
    "evhttp_send_reply_chunk": (None, [evhttp_request_p, evbuffer_p]),
    # void evhttp_send_reply_chunk_with_cb(struct evhttp_request *, struct evbuffer *,
    #     void (*cb)(struct evhttp_connection *, void *), void *arg);
    "evhttp_send_reply_chunk_with_cb": (
        None,
        [evhttp_request_p, evbuffer_p, evhttp_connection_cb, c_void_p],
    ),
    # void evhttp_send_reply_end(struct evhttp_request *req);
    "evhttp_send_reply_end": (None, [evhttp_request_p]),
    # struct evbuffer *evbuffer_new(void);
    "evbuffer_new": (evbuffer_p, []),
    # void evbuffer_free(struct evbuffer *buf);
    "evbuffer_free": (None, [evbuffer_p]),
    # size_t evbuffer_get_length(const struct evbuffer *buf);
    "evbuffer_get_length": (c_size_t, [evbuffer_p]),
    # int evbuffer_add(struct evbuffer *buf, const void *data, size_t datlen);
    "evbuffer_add": (c_int, [evbuffer_p, c_char_p, c_size_t]),
    # struct evbuffer_cb_entry *evbuffer_add_cb(struct evbuffer *buffer,
    #     evbuffer_cb_func cb, void *cbarg);
    "evbuffer_add_cb": (c_void_p, [evbuffer_p, evbuffer_cb_func, c_void_p]),
    # int evbuffer_remove_cb(struct evbuffer *buffer, evbuffer_cb_func cb, void *cbarg);
    "evbuffer_remove_cb": (c_int, [evbuffer_p, evbuffer_cb_func, c_void_p]),
    # unsigned char *evbuffer_pullup(struct evbuffer *buf, ev_ssize_t size);
    "evbuffer_pullup": (c_void_p, [evbuffer_p, c_ssize_t]),
    # int evbuffer_drain(struct evbuffer *buf, size_t len);
    "evbuffer_drain": (c_int, [evbuffer_p, c_size_t]),
    # int evbuffer_write(struct evbuffer *buffer, evutil_socket_t fd);
    "evbuffer_write": (c_int, [evbuffer_p, evutil_socket_t]),
    # int evbuffer_freeze(struct evbuffer *buf, int at_front);
    "evbuffer_freeze": (c_int, [evbuffer_p, c_int]),
    # int evbuffer_unfreeze(struct evbuffer *buf, int at_front);
    "evbuffer_unfreeze": (c_int, [evbuffer_p, c_int]),
    # int evbuffer_set_flags(struct evbuffer *buf, ev_uint64_t flags);
    "evbuffer_set_flags": (c_int, [evbuffer_p, ctypes.c_uint64]),
}
if ev_off_t is not None:
    _PROTOTYPES.update(
        {
            # struct evbuffer_file_segment *evbuffer_file_segment_new(
            #     int fd, ev_off_t offset, ev_off_t length, unsigned flags);
            "evbuffer_file_segment_new": (
                evbuffer_file_segment_p,
                [c_int, ev_off_t, ev_off_t, ctypes.c_uint],
            ),
            # void evbuffer_file_segment_free(struct evbuffer_file_segment *seg);
            "evbuffer_file_segment_free": (None, [evbuffer_file_segment_p]),
            # int evbuffer_add_file_segment(struct evbuffer *buf,
            #     struct evbuffer_file_segment *seg, ev_off_t offset, ev_off_t length);
            "evbuffer_add_file_segment": (
                c_int,
                [evbuffer_p, evbuffer_file_segment_p, ev_off_t, ev_off_t],
            ),
        }
    )


class LibeventMissing(ImportError):
    """libevent 2.1 could not be loaded; the message says what was tried and how to fix it."""


_SONAMES = {
    "darwin": [
        "libevent-2.1.7.dylib",
        "libevent.dylib",
        "/opt/homebrew/lib/libevent.dylib",
        "/usr/local/lib/libevent.dylib",
    ],
}.get(sys.platform, ["libevent-2.1.so.7", "libevent.so"])

_INSTALL_HINT = (
    "Install libevent 2.1 (Debian/Ubuntu: apt-get install libevent-2.1-7, or "
    "libevent-2.1-7t64 from Debian 13 and Ubuntu 24.04; "
    "Fedora: dnf install libevent; macOS: brew install libevent) or set COMET_LIBEVENT "
    "to the path of libevent's shared library."
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_blocking: ctypes.CDLL | None = None


def _candidates() -> Iterator[str]:
    explicit = os.environ.get("COMET_LIBEVENT")
    if explicit:
        yield explicit  # an explicit choice is never silently replaced by another
        return
    yield from _SONAMES
    # Last, and only when those failed: on Linux, without the library in ldconfig's
    # cache, find_library runs a C compiler on a temporary file, and with no writable
    # temporary directory (a read-only container) it raised, and nothing started.
    for name in ("event", "event-2.1"):
        try:
            found = ctypes.util.find_library(name)
        except OSError:
            continue
        if found and found not in _SONAMES:
            yield found


def declare(cdll: ctypes.CDLL) -> ctypes.CDLL:
    """Give every function we use its argtypes and restype; fail if one is missing."""
    for name, (restype, argtypes) in _PROTOTYPES.items():
        func = getattr(cdll, name)
        func.restype = restype
        func.argtypes = argtypes
    return cdll


def load() -> ctypes.CDLL:
    """Load libevent once and return the declared CDLL; raise LibeventMissing otherwise."""
    global _lib, _blocking
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for candidate in _candidates():
            try:
                cdll = ctypes.CDLL(candidate, use_errno=True)
            except OSError as exc:
                tried.append(f"{candidate} ({exc})")
                continue
            try:
                _blocking = declare(cdll)
                # Every call but the loop's sleep is short: keep the GIL across it, so
                # that the loop thread never queues behind busy view threads to get the
                # GIL back after each of its many calls (CDLL releases it every time).
                _lib = declare(ctypes.PyDLL(candidate, handle=cdll._handle, use_errno=True))
            except AttributeError as exc:
                tried.append(f"{candidate} (not libevent 2.1 with evhttp: {exc})")
                continue
            return _lib
        raise LibeventMissing(
            "libevent 2.1 could not be loaded; tried: " + "; ".join(tried) + ". " + _INSTALL_HINT
        )


def lib() -> ctypes.CDLL:
    """The loaded library (loading it on first use); its calls keep the GIL."""
    return _lib if _lib is not None else load()


def blocking_lib() -> ctypes.CDLL:
    """The same library through CDLL, whose calls release the GIL: for
    ``event_base_loop``, which sleeps in epoll while view threads run."""
    load()
    assert _blocking is not None
    return _blocking
