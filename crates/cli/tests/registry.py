#!/usr/bin/env python3
"""A registry for the `images pull` tests: the OCI distribution API's read
side over an OCI image layout directory, on loopback, behind a Bearer
token service (as Docker Hub and most registries are) that wants Basic
credentials.

usage: registry.py LAYOUT PORT_FILE USER PASSWORD

GET /v2/REPO/manifests/TAG|DIGEST and /v2/REPO/blobs/DIGEST serve the
layout's blobs (a tag is the ref.name annotation in index.json); a REPO
that starts with "tampered/" gets every layer with one byte changed, one
that starts with "lying/" the tagged manifest whatever it asks for, one
that starts with "huge/" a manifest whose layers claim a terabyte each.
GET /token?scope=... answers {"token": ...} to the right credentials.
The chosen port is written to PORT_FILE; the server stops when its
parent (the test) closes its stdin."""

import base64
import hashlib
import json
import os
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

layout, port_file, user, password = sys.argv[1:5]
token = "tok-" + secrets.token_hex(16)
index = json.load(open(os.path.join(layout, "index.json")))


def blob(digest):
    if not digest.startswith("sha256:") or "/" in digest or ".." in digest:
        return None
    p = os.path.join(layout, "blobs", "sha256", digest[len("sha256:"):])
    return open(p, "rb").read() if os.path.isfile(p) else None


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, body=b"", ctype="application/json", extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        host = self.headers.get("Host", "")
        if self.path.startswith("/token"):
            want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
            return self.send(200, json.dumps({"token": token}).encode())
        if self.headers.get("Authorization") != "Bearer " + token:
            challenge = f'Bearer realm="http://{host}/token",service="test-registry"'
            return self.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                             extra={"WWW-Authenticate": challenge})
        parts = self.path.split("/")
        if len(parts) < 5 or parts[1] != "v2":
            return self.send(404)
        repo, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if kind == "manifests":
            desc = None
            for m in index["manifests"]:
                name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                if ref in (m["digest"], name) or repo.startswith("lying/"):
                    desc = m
            if desc is None:
                d = blob(ref)
                if d is None:
                    return self.send(404)
                return self.send(200, d, json.loads(d).get("mediaType", "application/json"))
            body = blob(desc["digest"])
            if repo.startswith("huge/"):
                m = json.loads(body)
                for l in m["layers"]:
                    l["size"] = 1 << 40
                body = json.dumps(m).encode()
            return self.send(200, body, desc["mediaType"])
        if kind == "blobs":
            d = blob(ref)
            if d is None:
                return self.send(404)
            if repo.startswith("tampered/") and len(d) > 1000:
                d = d[:500] + bytes([d[500] ^ 1]) + d[501:]
            return self.send(200, d, "application/octet-stream")
        return self.send(404)


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(port_file + ".tmp", port_file)
threading.Thread(target=srv.serve_forever, daemon=True).start()
sys.stdin.read()
srv.shutdown()
