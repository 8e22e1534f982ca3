#!/usr/bin/env python3
"""Webhook receiver for the usage tests (stdlib only).

Appends one JSON line per POST to --out: {"headers": {...lower-cased...}, "body": <parsed JSON>,
"raw": <body text as received>, "status": <status sent>}. --fail-first N answers the first N POSTs with 500 (still recorded).
--count-only records {"records": <request_ids in the body>, "status": ...} instead, without parsing:
the load tests' billing endpoint, which must not eat the CPU the gateway is measured on.
Prints "ready 127.0.0.1:PORT" on stdout once listening (--port 0: any free port). The socket has
SO_REUSEPORT, so it can take over a port a test holds closed until then.
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--fail-first", type=int, default=0)
parser.add_argument("--count-only", action="store_true")
args = parser.parse_args()

lock = threading.Lock()
seen = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global seen
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        with lock:
            seen += 1
            status = 500 if seen <= args.fail_first else 200
            if args.count_only:
                line = {"records": raw.count(b'"request_id"'), "status": status}
            else:
                line = {
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(raw),
                    "raw": raw.decode(),
                    "status": status,
                }
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
        payload = b'{"status":"ok"}' if status == 200 else b'{"error":"try later"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_):
        pass


class Server(ThreadingHTTPServer):
    allow_reuse_port = True

    def handle_error(self, request, client_address):
        # A client that resets mid-request (the fault tests do) is not the receiver's error.
        pass


server = Server(("127.0.0.1", args.port), Handler)
print("ready %s:%d" % server.server_address, flush=True)
server.serve_forever()
