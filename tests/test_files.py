"""Files through wsgi.file_wrapper: sent by descriptor (sendfile), over real sockets."""

import glob
import gzip
import io
import os
import socket
import tempfile
import time

import pytest
import requests
from django.core.files import File
from django.http import FileResponse

from django_comet.evloop.files import FileWrapper

from .processes import fd_count, reset_on_close, runcomet, wait_until
from .views import pattern

MIB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _remove_the_test_files():
    yield
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "django-comet-test-pattern-*")):
        os.unlink(path)


def read_response(sock: socket.socket, *, head_only: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of one response framed by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed after {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    if head_only:
        return head, body
    while len(body) < length:
        more = sock.recv(MIB)
        assert more, f"connection closed after {len(body)} of {length} body bytes"
        body += more
    return head, body


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_a_file_response_is_sent_from_the_files_position(request, server_name):
    server = request.getfixturevalue(server_name)
    size, skip = 5 * MIB + 7, 1000
    response = requests.get(server.url + f"/t/file/?size={size}&skip={skip}", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(size - skip)
    assert "Transfer-Encoding" not in response.headers
    assert response.content == pattern(size)[skip:]


def test_file_responses_keep_the_connection_alive_and_head_sends_no_body(comet):
    size = 3 * MIB
    with comet.connect() as sock:
        sock.settimeout(30)
        target = f"/t/file/?size={size}".encode()
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, body = read_response(sock)
        assert body == pattern(size)
        sock.sendall(b"HEAD " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, rest = read_response(sock, head_only=True)
        assert b"Content-Length: %d" % size in head and rest == b""
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, body = read_response(sock)  # the HEAD left no body bytes in the way
        assert body == pattern(size)


def test_a_file_keeps_an_http10_connection_alive(comet):
    """With its Content-Length, an HTTP/1.0 keep-alive client keeps its connection."""
    size = 2 * MIB
    with comet.connect() as sock:
        sock.settimeout(30)
        for _ in range(2):
            sock.sendall(
                b"GET /t/file/?size=%d HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                b"Connection: keep-alive\r\n\r\n" % size
            )
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.0 200") and body == pattern(size)


def test_a_file_in_memory_is_read_in_blocks(comet):
    size = 100_000  # under glibc's mmap threshold, as pattern_file explains
    response = requests.get(comet.url + f"/t/file/?size={size}&skip=10&memory=1", timeout=30)
    assert response.status_code == 200
    assert response.content == pattern(size)[10:]


def test_slow_downloads_do_not_hold_the_worker_threads(demo_db):
    """Two clients that stop reading big files must not take the one worker thread: the
    kernel sends the files, and the next view runs at once."""
    server = runcomet("--threads", "1", db=demo_db)
    try:
        server.status()  # serving: all its own descriptors are open
        fds = fd_count(server.proc.pid)
        stalled = []
        for _ in range(2):
            sock = server.connect()
            sock.sendall(b"GET /t/file/?size=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (64 * MIB))
            read_response(sock, head_only=True)  # then read no more
            stalled.append(sock)
        response = requests.get(server.url + "/t/count/", timeout=10)
        assert response.status_code == 200
        assert server.status()["in_flight"] == 3  # both files still on their way, and this
        for sock in stalled:  # the clients vanish mid-file: nothing is left behind
            reset_on_close(sock)
            sock.close()
        server.wait_for_status(lambda s: s["in_flight"] == 1)
        wait_until(lambda: fd_count(server.proc.pid) <= fds)
    finally:
        assert server.stop() == 0, "".join(server.output)


# -- the wrapper itself, in memory --------------------------------------------------------


def test_the_wrapper_iterates_in_blocks_and_closes_the_file():
    f = io.BytesIO(b"abcdefg")
    wrapper = FileWrapper(f, 3)
    assert list(wrapper) == [b"abc", b"def", b"g"]
    assert wrapper.file_range(None) is None  # no descriptor: read it
    wrapper.close()
    assert f.closed


def test_the_range_of_a_regular_file_starts_at_its_position(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with open(path, "rb") as f:
        f.read(3)  # buffered: the descriptor is further on than the file's position
        file, offset, count = FileWrapper(f).file_range(None)
        assert file.fd != f.fileno()  # a descriptor of its own
        assert (offset, count) == (3, 7)
        assert os.pread(file.fd, count, offset) == b"3456789"
        fd = file.fd
        del file  # dropped before it was handed on: closed
        with pytest.raises(OSError):
            os.fstat(fd)
        file, offset, count = FileWrapper(f).file_range(5)  # its Content-Length
        file.close()
        assert (offset, count) == (3, 5)
        assert FileWrapper(f).file_range(8) is None  # shorter than its Content-Length


def test_a_compressed_file_is_read_not_sent_by_descriptor(tmp_path):
    """A gzip file has a descriptor and a position, of its compressed bytes."""
    path = tmp_path / "f.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"x" * 10_000)
    with gzip.open(path, "rb") as f:
        wrapper = FileWrapper(f)
        assert wrapper.file_range(None) is None
        assert b"".join(wrapper) == b"x" * 10_000


def test_proxies_of_a_plain_file_are_looked_through(tmp_path):
    """Django's File (what FieldFile.open() gives) and tempfile's wrapper read their
    ``file`` as is, so the range is that file's."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with File(open(path, "rb")) as django_file:
        django_file.read(2)
        file, offset, count = FileWrapper(django_file).file_range(None)
        file.close()
        assert (offset, count) == (2, 8)
    with tempfile.NamedTemporaryFile() as temporary:
        temporary.write(b"abc")
        temporary.seek(1)
        file, offset, count = FileWrapper(temporary).file_range(None)
        file.close()
        assert (offset, count) == (1, 2)


def test_a_file_type_whose_read_changes_the_bytes_is_read(tmp_path):
    """A subclass of a file type, or a Django File whose ``read`` is its own, may give
    other bytes than the descriptor holds (a storage that decrypts): what goes out must
    be what reading gives, so it is read, not sent by descriptor."""

    class Upper(io.BufferedReader):
        def read(self, size=-1):
            return super().read(size).upper()

    class UpperFile(File):
        def read(self, *args):
            return self.file.read(*args).upper()

    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    with Upper(io.FileIO(path)) as f:
        wrapper = FileWrapper(f)
        assert wrapper.file_range(None) is None
        assert b"".join(wrapper) == b"ABCDEF"
    with UpperFile(open(path, "rb")) as f:
        assert FileWrapper(f).file_range(None) is None


def test_a_file_holding_less_than_its_size_says_is_read(tmp_path):
    """sysfs gives every file a size of 4096, whatever it holds: sent by descriptor, a
    made-up length would go out, and the bytes end short of it."""
    path = "/sys/class/net/lo/mtu"
    if not os.path.exists(path):
        pytest.skip("no sysfs here")
    with open(path, "rb") as f:
        assert os.fstat(f.fileno()).st_size > len(f.read())
        f.seek(0)
        assert FileWrapper(f).file_range(None) is None


def test_a_file_that_cannot_be_looked_at_is_read(tmp_path, monkeypatch):
    """Whatever fails while the range is worked out (here fstat, with an error no file
    call gives: a file system's own library, a mock) leaves the file to be read."""

    def failing_fstat(fd):
        raise RuntimeError("no stat for you")

    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    with open(path, "rb") as f:
        monkeypatch.setattr(os, "fstat", failing_fstat)
        wrapper = FileWrapper(f)
        assert wrapper.file_range(None) is None
        monkeypatch.undo()
        assert b"".join(wrapper) == b"abcdef"


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_a_django_file_that_changes_its_bytes_sends_what_it_reads(request, server_name):
    server = request.getfixturevalue(server_name)
    size, skip = 100_000, 10  # (under glibc's mmap threshold: see pattern_file)
    response = requests.get(
        server.url + f"/t/file/?size={size}&skip={skip}&reversing=1", timeout=30
    )
    assert response.status_code == 200
    data, block = pattern(size)[skip:], FileResponse.block_size
    assert response.content == b"".join(
        data[at : at + block][::-1] for at in range(0, len(data), block)
    )


def test_a_pipe_has_no_range():
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as r, open(write_end, "wb"):
        assert FileWrapper(r).file_range(None) is None


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_a_client_that_half_closes_gets_the_whole_file(request, server_name):
    server = request.getfixturevalue(server_name)
    size = 3 * MIB
    with server.connect() as sock:
        sock.settimeout(30)
        sock.sendall(b"GET /t/file/?size=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % size)
        sock.shutdown(socket.SHUT_WR)
        _, body = read_response(sock)
    assert body == pattern(size)


def test_a_download_outlasting_the_timeout_is_not_cut_while_it_is_read(demo_db):
    """COMET_TIMEOUT is an inactivity timeout: a client reading a file steadily for
    longer must get all of it, with views in the loop thread too (the connection's read
    timeout used to fire in the middle of the file)."""
    server = runcomet("--threads", "0", db=demo_db, env={"TEST_TIMEOUT": "1"})
    size = 16 * MIB
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the kernel holds little
        with sock:
            sock.settimeout(30)
            sock.connect((server.host, server.port))
            sock.sendall(b"GET /t/file/?size=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % size)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            body = data.partition(b"\r\n\r\n")[2]
            while len(body) < size:
                more = sock.recv(65536)
                assert more, f"cut after {len(body)} of {size} bytes"
                body += more
                time.sleep(0.01)  # a reader slower than the server: the transfer takes seconds
        assert body == pattern(size)
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_the_access_log_counts_what_left_of_a_file_cut_short(comet):
    """A file is handed to libevent whole: a client leaving early must not be logged as
    having received all of it."""
    size = 32 * MIB
    target = f"/t/file/?size={size}&cut=1"
    with comet.connect() as sock:
        sock.settimeout(30)
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target.encode())
        received = 0
        while received < MIB:
            received += len(sock.recv(65536))
        reset_on_close(sock)  # reset
    assert comet.logged(f'{target} HTTP/1.1" 200 ')
    line = next(line for line in comet.output if f"{target} HTTP/1.1" in line)
    logged_bytes = int(line.split('" 200 ')[1].split()[0])
    assert MIB <= logged_bytes < size, line
