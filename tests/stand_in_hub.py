"""A stand-in Hugging Face Hub on loopback: the part of its HTTP API that huggingface_hub's model_info and
snapshot_download use (checked against huggingface_hub 2.4), for `HF_ENDPOINT=http://127.0.0.1:PORT`.

  GET  /api/models/{repo}[/revision/{rev}]    sha + siblings (sizes)
  GET  /api/models/{repo}/tree/{rev}           the file listing
  HEAD /{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}            the bytes; honours `Range: bytes=N-` with a 206

No xet headers are ever sent, so clients download over plain HTTP whether hf-xet is installed or not.
Faults to inject: `drop_after[file] = n` sends n bytes of that file's first GET, then cuts the connection;
`gated = True` answers every file request 401 GatedRepo unless the request carries `token`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

SHA = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    def __init__(self, repo: str, files: dict[str, bytes]):
        self.repo, self.files = repo, files
        self.drop_after: dict[str, int] = {}
        self.gated = False
        self.token = "hf_test_token"
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @classmethod
    def from_dir(cls, repo: str, directory: Path) -> StandInHub:
        return cls(repo, {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()})

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of one file, in order (None: the whole file)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + name)]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: StandInHub):
    repo = re.escape(hub.repo)
    info_re = re.compile(rf"^/api/models/{repo}(?:/revision/[^/]+)?$")
    tree_re = re.compile(rf"^/api/models/{repo}/tree/[^/]+$")
    file_re = re.compile(rf"^/{repo}/resolve/[^/]+/(.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if info_re.match(path):
                siblings = [{"rfilename": n, "size": len(d), "blobId": _etag(d)[:40]} for n, d in hub.files.items()]
                return self._json({"id": hub.repo, "sha": SHA, "private": False,
                                   "gated": "manual" if hub.gated else False, "siblings": siblings}, body)
            if tree_re.match(path):
                return self._json([{"type": "file", "path": n, "size": len(d), "oid": _etag(d)[:40]}
                                   for n, d in hub.files.items()], body)
            m = file_re.match(path)
            if not m or m.group(1) not in hub.files:
                return self._send(404, {"X-Error-Code": "RepoNotFound" if not m else "EntryNotFound"}, b"", body)
            if hub.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._send(401, {"X-Error-Code": "GatedRepo", "X-Error-Message":
                                        "Access to this model is restricted. You must be authenticated."}, b"", body)
            self._file(m.group(1), body)

        def _file(self, name: str, body: bool) -> None:
            data = hub.files[name]
            start = 0
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if body and rng:
                start = int(rng.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            cut = hub.drop_after.pop(name, None) if body else None
            if cut is None:
                return self._send(206 if start else 200, headers, data[start:], body)
            # announce the whole file, send part of it, then cut the connection
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

        def _json(self, obj, body: bool) -> None:
            self._send(200, {"Content-Type": "application/json", "X-Repo-Commit": SHA},
                       json.dumps(obj).encode(), body)

        def _send(self, status: int, headers: dict, data: bytes, body: bool) -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
