"""A deliberately literal HTTP/1.1 upstream for relay tests: fixed bytes on the wire.

Raw sockets, not http.server, so the tests control chunk boundaries, extensions, trailers and
connection handling exactly. Usage: fixed_upstream.py PORT (0: any free port); prints
"ready 127.0.0.1:PORT" once listening. Paths:
  /v1/fixed/sse     chunked SSE in irregular chunks (an extension, a trailer), 50 ms apart
  /v1/fixed/json    Content-Length JSON
  /v1/fixed/close   body delimited by closing the connection (HTTP/1.0 style)
  /v1/fixed/idle    keep-alive response, then the server closes the idle connection after 100 ms
                    (what uvicorn does after its keep-alive timeout)
  /fixed/stats      JSON {"connections": .., "requests": .., "idle_closed": ..}: connections that
                    carried a request, requests read, idle connections closed by the server (the
                    stats requests and their connections are not counted), so tests can tell a
                    reused connection from a new one and wait for the idle close
"""
import socket
import sys
import threading
import json
import time

SSE_CHUNKS = [
    b'data: {"n":1}\n\n',
    b'data: {"n":2}\n\ndata: {"n"',
    b':3}\n\n',
    b"data: [DONE]\n\n",
]
stats = {"connections": 0, "requests": 0, "idle_closed": 0}
stats_lock = threading.Lock()
JSON = b'{"id":"x","object":"chat.completion","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'


def read_request(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, b""
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None, b""
        rest += data
    path = head.split(b" ")[1].decode()
    return path, rest[length:]


def count(name):
    with stats_lock:
        stats[name] += 1


def serve(conn):
    buf = b""
    counted = False
    try:
        while True:
            path, buf = read_request(conn, buf)
            if path is None:
                return
            if path == "/fixed/stats":
                with stats_lock:
                    body = json.dumps(stats).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                continue
            if not counted:
                count("connections")
                counted = True
            count("requests")
            if path.startswith("/v1/fixed/sse"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nx-upstream: fixed\r\n\r\n")
                for i, c in enumerate(SSE_CHUNKS):
                    ext = b";note=x" if i == 1 else b""
                    conn.sendall(b"%x%s\r\n%s\r\n" % (len(c), ext, c))
                    time.sleep(0.05)
                conn.sendall(b"0\r\nx-trailer: t\r\n\r\n")
            elif path.startswith("/v1/fixed/json"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(JSON), JSON))
            elif path.startswith("/v1/fixed/close"):
                conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil-close body")
                return
            elif path.startswith("/v1/fixed/idle"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                conn.settimeout(0.1)
                try:
                    more = conn.recv(65536)
                except socket.timeout:
                    conn.close()
                    count("idle_closed")
                    return
                if not more:
                    return
                buf += more
                conn.settimeout(None)
            else:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
    except OSError:
        pass
    finally:
        conn.close()


def main():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(128)
    print("ready %s:%d" % srv.getsockname(), flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
