"""A local web page for hand-labelling generated orbit videos good or bad (the quality SVM's training labels).

The page plays one video of a shard folder at a time; `g` marks it good, `b` bad, `s` skips it, ArrowLeft goes
back. Each label is appended to a JSONL file, one object per line, flushed and fsync'd at once so a killed
server loses nothing:

    {"key": "vid0001", "label": 1, "object_id": "...", "time": "2025-01-01T12:00:00+00:00"}

label 1 = good, 0 = bad. Relabelling a video appends another line: the LAST line for a key wins
(`read_labels`), so the file is an append-only history.

Standard library only (http.server), and the page uses no external resources: labelling machines may be offline.

The server is for the labeller's own browser, and guards against the other pages that browser opens:

- a write (POST /api/label) needs `Content-Type: application/json`, an `Origin` (when sent) equal to the page's
  own, and the `X-Label-Token` header holding the per-run token embedded in the served page, so no other site can
  label through the labeller's browser (a cross-site form or fetch can send none of these);
- every request's `Host` must name the address served (127.0.0.1:PORT, localhost:PORT or the bound host:PORT),
  so a DNS-rebinding page cannot read the page (and its token) or the API under its own name;
- a write's body must give a `Content-Length` of at most `MAX_BODY` bytes; bad fields are a 400 with a JSON error;
- the page may not be framed by another site (no click-jacking of the label buttons).

Listening on an address other than loopback prints a warning: anyone who reaches the port can then label.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import json
import os
import secrets
import sys
import tarfile
import threading
import time
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

from vfusion3d_lightning.data.labels import read_labels, repair_jsonl_tail
from vfusion3d_lightning.data.schema import (
    MultiViewSample,
    SampleError,
    check_tar_end,
    complete_shards,
    decode_sample,
    unreadable_shard,
)
from vfusion3d_lightning.io import on_white, to_uint8_images

LABELS = {"good": 1, "bad": 0}
MAX_BODY = 64 * 1024  # bytes; a label is well under 1 KiB
TOKEN_HEADER = "X-Label-Token"
LABEL_FIELDS = ("key", "label")


def _index_shards(folder: Path) -> dict[str, dict]:
    """key -> {shard, members (suffix -> (offset, size)), object_id, prompt, frames}, from tar headers and the
    small .json files only, so a video's images are read (by offset) only when it is shown."""
    shards = complete_shards(folder)
    if not shards:
        raise FileNotFoundError(f"{folder}: no shard-*.tar files; the labeller needs a folder of shard-*.tar files "
                                "(as written by `vfusion3d-lightning generate`)")
    videos: dict[str, dict] = {}
    for shard in shards:
        found: dict[str, dict] = {}
        try:
            check_tar_end(shard)
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, suffix = os.path.basename(member.name).partition(".")
                    entry = found.setdefault(key, {"shard": shard, "members": {}})
                    entry["members"][suffix] = (member.offset_data, member.size)
                    if suffix == "json":
                        try:
                            meta = json.loads(tar.extractfile(member).read())
                        except ValueError as err:
                            raise SampleError(f"sample {key!r} in {shard}: .json is not valid JSON ({err})") from err
                        entry.update(object_id=str(meta.get("object_id", "")), prompt=meta.get("prompt"),
                                     frames=int(meta.get("num_views", 0)))
        except tarfile.TarError as err:  # tarfile's message does not name the shard
            raise unreadable_shard(shard, err) from err
        for key, entry in found.items():
            videos.setdefault(key, entry)  # a key repeated in a later shard is the same video; keep the first
    return videos


def _is_loopback(address: str) -> bool:
    """Whether a bound address (an IP as the socket reports it) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # not an IP (the socket reports one, so this is a caller's name): only "localhost" is safe
        return address.lower() == "localhost"


def exposure_warning(address: str, port: int) -> str | None:
    """The warning line for listening on `address`:`port`, or None for a loopback address."""
    if _is_loopback(address):
        return None
    shown = "all addresses" if address in ("0.0.0.0", "::", "") else address
    return (f"WARNING: label-ui is listening on {shown} (port {port}), not on loopback: anyone who can reach this "
            f"machine on port {port} can watch the videos and write labels. Use --host 127.0.0.1 unless you mean "
            "to share the page on a trusted network.")


def _frame_png(view: np.ndarray) -> bytes:
    """RGBA view -> PNG bytes composited on white (what a viewer judges; transparency would show the page)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_images(on_white(view[None]))[0]).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class LabelServer:
    """Serves the labelling page for the videos in `shards_dir`, appending labels to `labels_path`.

    `start()` listens on a background thread (port 0 picks a free port) and returns; `url` is the page; `stop()`.
    """

    def __init__(self, shards_dir: str | Path, labels_path: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.videos = _index_shards(Path(shards_dir))
        self.keys = list(self.videos)
        self.labels_path = Path(labels_path)
        # a server killed mid-append leaves a cut last line: drop it (that label was never confirmed to the page)
        repaired = repair_jsonl_tail(self.labels_path)
        if repaired:
            print(f"label-ui: {repaired}", file=sys.stderr, flush=True)
        # fails early on a corrupt file, before any label is added
        self.labels = read_labels(self.labels_path, missing_ok=True)
        self._lock = threading.Lock()
        # decoding a video is the cost and the page asks for its frames one by one: keep the last few
        self.frames = functools.lru_cache(maxsize=16)(self._decode_frames)
        # written into the served page and required on every write: other sites' pages cannot read it
        self.token = secrets.token_urlsafe(32)
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self
        self._thread: threading.Thread | None = None
        bound, bound_port = self._httpd.server_address[:2]
        names = {"127.0.0.1", "localhost", host.lower(), bound.lower()}
        # the Host header a request must carry (a browser leaves out the default port 80)
        self.allowed_hosts = {f"{name}:{bound_port}" for name in names if name}
        if bound_port == 80:
            self.allowed_hosts |= {name for name in names if name}
        warning = exposure_warning(bound, bound_port)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> LabelServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="label-ui", daemon=True)
        self._thread.start()  # the socket already listens (bound in __init__), so the URL works now
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LabelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _decode_frames(self, key: str) -> list[bytes]:
        entry = self.videos[key]
        raw: dict = {"__key__": key, "__url__": str(entry["shard"])}
        with open(entry["shard"], "rb") as tar:
            for suffix, (offset, size) in entry["members"].items():
                tar.seek(offset)
                raw[suffix] = tar.read(size)
        sample: MultiViewSample = decode_sample(raw)
        return [_frame_png(view) for view in sample.images]

    def video_list(self) -> dict:
        with self._lock:
            videos = [{"key": k, "label": self.labels.get(k), "prompt": self.videos[k].get("prompt"),
                       "object_id": self.videos[k].get("object_id"), "frames": self.videos[k].get("frames", 0)}
                      for k in self.keys]
        return {"videos": videos, "labelled": sum(v["label"] is not None for v in videos), "total": len(videos)}

    def add_label(self, key: str, label: str) -> dict:
        """Append one label (ValueError on a bad key or label); returns the new progress."""
        if not isinstance(label, str) or label not in LABELS:
            raise ValueError(f'"label" must be one of {sorted(LABELS)} (a string), got {label!r}')
        if not isinstance(key, str) or not key:
            raise ValueError(f'"key" must be a video key (a non-empty string, as listed by /api/videos), got {key!r}')
        if key not in self.videos:
            raise ValueError(f"unknown video key {key!r}; the keys are listed by /api/videos")
        line = json.dumps({"key": key, "label": LABELS[label], "object_id": self.videos[key].get("object_id"),
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        with self._lock:
            self.labels_path.parent.mkdir(parents=True, exist_ok=True)
            with self.labels_path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
            self.labels[key] = LABELS[label]
            labelled = sum(k in self.labels for k in self.keys)
        return {"key": key, "label": LABELS[label], "labelled": labelled, "total": len(self.keys)}


class _Refused(Exception):
    """A request answered with `status` and a JSON {"error": message}; its connection is then closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server_version = "vfusion3d-label-ui"
    timeout = 60  # seconds a connection may sit idle or send its body slowly before it is dropped

    def log_message(self, format, *args):  # a page plays dozens of frames a second; keep the terminal quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")  # no other site may frame the page and steer its clicks
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.send_header("Referrer-Policy", "no-referrer")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict, close: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", close=close)

    def _refuse(self, refused: _Refused) -> None:
        self.close_connection = True  # an unread body must not be taken for the next request
        self._json(refused.status, {"error": str(refused)}, close=True)

    def _check_host(self) -> None:
        """Refuse a Host other than the address served: a DNS-rebinding page reaches us under its own name."""
        app: LabelServer = self.server.app
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in app.allowed_hosts:
            raise _Refused(HTTPStatus.FORBIDDEN,
                           f"Host {host or '(none)'!r} is not this server's address; open the page at "
                           f"{app.url} (or {' / '.join(sorted(app.allowed_hosts))})")

    def _check_write(self) -> None:
        """Refuse a write that a page of another site could have sent (see the module docstring)."""
        app: LabelServer = self.server.app
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "").strip().lower()
        if origin is not None and origin.strip().lower() != f"http://{host}":
            raise _Refused(HTTPStatus.FORBIDDEN,
                           f"Origin {origin!r} is not this server's origin http://{host}; labels are written only "
                           f"from the page at {app.url}")
        token = self.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), app.token.encode()):
            raise _Refused(HTTPStatus.FORBIDDEN,
                           f"missing or wrong {TOKEN_HEADER} header; label from the page at {app.url} (reload it if "
                           "the server was restarted: each run has a new token)")
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type must be application/json, got {content_type or '(none)'!r}")

    def _read_body(self) -> bytes:
        """The request body, refusing a missing, malformed or oversized Content-Length (and chunked bodies)."""
        if self.headers.get("Transfer-Encoding"):
            raise _Refused(HTTPStatus.LENGTH_REQUIRED,
                           "chunked bodies are not accepted; send the JSON with a Content-Length header")
        length = self.headers.get("Content-Length")
        if length is None:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        digits = length.strip()
        if not (digits.isascii() and digits.isdigit()):  # no sign, no spaces inside, no "1e3", no "²"
            raise _Refused(HTTPStatus.BAD_REQUEST,
                           f"Content-Length must be a whole number of bytes, got {length!r}")
        size = int(digits) if len(digits) <= 18 else MAX_BODY + 1  # int() refuses over 4300 digits
        if size > MAX_BODY:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {size if len(digits) <= 18 else 'over 10^18'} bytes is over the {MAX_BODY}-byte "
                           'limit; a label is {"key": ..., "label": "good" or "bad"}')
        body = self.rfile.read(size)
        if len(body) != size:
            raise _Refused(HTTPStatus.BAD_REQUEST,
                           f"body ended after {len(body)} of the {size} bytes its Content-Length promised")
        return body

    def do_GET(self):
        app: LabelServer = self.server.app
        try:
            self._check_host()
        except _Refused as refused:
            return self._refuse(refused)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            page = PAGE.replace("__LABEL_TOKEN__", app.token)
            return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        if path == "/api/videos":
            return self._json(HTTPStatus.OK, app.video_list())
        parts = path.split("/")  # /frame/<key>/<index>.png
        if len(parts) == 4 and parts[1] == "frame" and parts[3].endswith(".png"):
            key, index = unquote(parts[2]), parts[3][:-4]
            if key in app.videos and index.isdigit():
                try:
                    frames = app.frames(key)
                except SampleError as err:  # a broken sample: say why on the page rather than drop the connection
                    return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(err)})
                if int(index) < len(frames):
                    return self._send(HTTPStatus.OK, frames[int(index)], "image/png", cache=True)
        self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

    def do_POST(self):
        app: LabelServer = self.server.app
        try:
            self._check_host()
            if urlsplit(self.path).path != "/api/label":
                raise _Refused(HTTPStatus.NOT_FOUND, f"not found: {self.path}; labels are POSTed to /api/label")
            self._check_write()
            raw = self._read_body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise _Refused(HTTPStatus.BAD_REQUEST, f"body is not JSON ({err}); send "
                               '{"key": ..., "label": "good" or "bad"}') from None
            if not isinstance(body, dict):
                raise _Refused(HTTPStatus.BAD_REQUEST, 'expected a JSON object {"key": ..., "label": "good" or '
                               f'"bad"}}, got a JSON {type(body).__name__}')
            extra = sorted(set(body) - set(LABEL_FIELDS))
            if extra:
                raise _Refused(HTTPStatus.BAD_REQUEST, f"unexpected fields {extra}; a label has only "
                               f"{list(LABEL_FIELDS)}")
            try:
                result = app.add_label(body.get("key"), body.get("label"))
            except ValueError as err:
                raise _Refused(HTTPStatus.BAD_REQUEST, str(err)) from None
            except OSError as err:  # e.g. a full disk: say so on the page rather than drop the connection
                raise _Refused(HTTPStatus.INTERNAL_SERVER_ERROR,
                               f"could not append to {app.labels_path} ({err}); free the space or fix the "
                               "permissions, then label again") from None
        except _Refused as refused:
            return self._refuse(refused)
        self._json(HTTPStatus.OK, result)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Label orbit videos</title>
<meta name="label-token" content="__LABEL_TOKEN__">
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f2f2f2; color: #222; }
  main { max-width: 560px; margin: 24px auto; padding: 16px; background: #fff; border-radius: 8px;
         box-shadow: 0 1px 4px rgba(0,0,0,.15); text-align: center; }
  #frame { width: min(100%, 512px, 62vh); aspect-ratio: 1; object-fit: contain; background: #fff;
           border: 1px solid #ddd; }
  #key { font-family: monospace; font-size: 15px; margin: 8px 0 2px; }
  #prompt { min-height: 1.3em; font-style: italic; margin: 2px 0 8px; }
  #status { min-height: 1.3em; font-weight: bold; }
  .good { color: #1a7f37; } .bad { color: #c62828; }
  #buttons button { font-size: 16px; margin: 6px 4px; padding: 8px 16px; border-radius: 6px;
                    border: 1px solid #999; background: #fafafa; cursor: pointer; }
  #good { border-color: #1a7f37 !important; } #bad { border-color: #c62828 !important; }
  #progress, .help { color: #555; font-size: 14px; }
  #progress { margin-bottom: 8px; }
  #error { color: #c62828; min-height: 1.2em; }
</style></head>
<body><main>
  <div id="progress">loading...</div>
  <img id="frame" alt="video frame">
  <div id="key"></div>
  <div id="prompt"></div>
  <div id="status"></div>
  <div id="buttons">
    <button id="prev" title="ArrowLeft">&larr; prev</button>
    <button id="bad" title="b">bad (b)</button>
    <button id="skip" title="s">skip (s)</button>
    <button id="good" title="g">good (g)</button>
  </div>
  <div class="help">keys: g = good, b = bad, s = skip, &larr; = previous</div>
  <div id="error"></div>
</main>
<script>
const $ = (id) => document.getElementById(id);
let videos = [], current = 0, timer = null, busy = false;
// this run's write token (the server refuses labels without it, so other sites cannot label through the browser)
const TOKEN = document.querySelector('meta[name="label-token"]').content;

function frameUrl(key, i) { return "/frame/" + encodeURIComponent(key) + "/" + i + ".png"; }

function progress() {
  const n = videos.filter((v) => v.label !== null).length;
  const good = videos.filter((v) => v.label === 1).length;
  $("progress").textContent = n + " labelled of " + videos.length + " (" + good + " good, " + (n - good) +
    " bad) \\u00b7 video " + (current + 1) + " of " + videos.length;
}

// the next unlabelled video after i (wrapping round), or simply the next one when all are labelled
function nextIndex(i) {
  for (let step = 1; step < videos.length; step++) {
    const j = (i + step) % videos.length;
    if (videos[j].label === null) return j;
  }
  return (i + 1) % videos.length;
}

function show(i) {
  current = i;
  clearInterval(timer);
  const v = videos[i];
  $("key").textContent = v.key;
  $("prompt").textContent = v.prompt || "(no prompt)";
  $("status").textContent = v.label === null ? "unlabelled" : v.label === 1 ? "labelled good" : "labelled bad";
  $("status").className = v.label === null ? "" : v.label === 1 ? "good" : "bad";
  progress();
  // preload every frame so the loop plays smoothly from the browser cache
  const frames = [];
  for (let f = 0; f < v.frames; f++) { const im = new Image(); im.src = frameUrl(v.key, f); frames.push(im); }
  let f = 0;
  $("frame").src = frames[0].src;
  timer = setInterval(() => { f = (f + 1) % frames.length; $("frame").src = frames[f].src; }, 120);
}

async function label(name) {
  if (busy || !videos.length) return;
  busy = true;
  try {
    const v = videos[current];
    const r = await fetch("/api/label", {
      method: "POST", headers: { "Content-Type": "application/json", "X-Label-Token": TOKEN },
      body: JSON.stringify({ key: v.key, label: name }) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.statusText);
    v.label = body.label;
    $("error").textContent = "";
    show(nextIndex(current));
  } catch (err) {
    $("error").textContent = "label not saved: " + err.message;
  } finally { busy = false; }
}

function skip() { if (videos.length) show(nextIndex(current)); }
function prev() { if (current > 0) show(current - 1); }

$("good").onclick = () => label("good");
$("bad").onclick = () => label("bad");
$("skip").onclick = skip;
$("prev").onclick = prev;
document.addEventListener("keydown", (e) => {
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;  // holding a key must not label a run of videos
  if (e.key === "g") label("good");
  else if (e.key === "b") label("bad");
  else if (e.key === "s") skip();
  else if (e.key === "ArrowLeft") prev();
});

fetch("/api/videos").then((r) => r.json()).then((data) => {
  videos = data.videos;
  if (!videos.length) { $("progress").textContent = "no videos"; return; }
  const first = videos.findIndex((v) => v.label === null);
  show(first < 0 ? 0 : first);
}).catch((err) => { $("error").textContent = "cannot load the video list: " + err.message; });
</script>
</body></html>
"""


def label_ui(shards: Path, labels: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve a local page that plays each video of a shard folder and appends `{"key", "label"}` lines to the
    labels file (g good, b bad, s skip, Left back); runs until Ctrl-C.

    Args:
        shards: folder of shard-*.tar files holding the videos to label.
        labels: labels JSONL file; labels are appended, and the last line for a video wins.
        host: address to listen on; anything but loopback prints a warning, since whoever reaches the port can
            then label (the page is then opened at that address: requests naming another Host are refused).
        port: port to listen on; 0 picks a free one.
    """
    server = LabelServer(shards, labels, host=host, port=port).start()
    listing = server.video_list()
    try:
        print(f"labelling {listing['total']} videos ({listing['labelled']} labelled) -> {labels}\n"
              f"open {server.url} (g = good, b = bad, s = skip, Left = previous); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.stop()
