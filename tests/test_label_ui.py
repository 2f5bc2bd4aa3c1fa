"""The labelling page: a real headless Chromium labels videos through the page, plus the HTTP API and labels file,
and the API's guards against other sites (CSRF, DNS rebinding), odd input and a labels file cut by a kill."""

import http.client
import io
import json
import re
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vfusion3d_lightning.commands import label_ui
from vfusion3d_lightning.commands.label_ui import LabelServer
from vfusion3d_lightning.data.labels import read_labels, repair_jsonl_tail
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter

KEYS = ["vid0000", "vid0001", "vid0002"]


def make_video(key: str, colour: tuple[int, int, int], frames: int = 16, size: int = 32) -> MultiViewSample:
    """A disk on a transparent background that moves right frame by frame."""
    images = np.zeros((frames, size, size, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for f in range(frames):
        disk = (yy - size / 2) ** 2 + (xx - 8 - f) ** 2 < (size / 4) ** 2
        images[f, ..., :3] = colour
        images[f, ..., 3] = np.where(disk, 255, 0)
    return MultiViewSample(key=key, object_id=f"object-{key}", source="synthetic", images=images,
                           prompt=f"a {colour} ball ({key})")


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "videos"
    with ShardWriter(folder, maxcount=2) as writer:  # two shards, so the index spans more than one tar
        for key, colour in zip(KEYS, [(220, 40, 40), (40, 160, 40), (40, 40, 220)]):
            writer.write_sample(make_video(key, colour))
    return folder


@pytest.fixture
def server(shards, tmp_path):
    with LabelServer(shards, tmp_path / "labels" / "labels.jsonl") as running:
        yield running


def page_token(url: str) -> str:
    """The write token the served page carries, as the page's script reads it ("" when the page has none)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        found = re.search(r'<meta name="label-token" content="([^"]*)">', response.read().decode())
    return found.group(1) if found else ""


def post(url: str, payload) -> tuple[int, dict]:
    """POST a label the way the page does: JSON, with the page's token."""
    request = urllib.request.Request(url + "api/label", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Label-Token": page_token(url)})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def browser(chromium):
    return chromium("--disable-gpu", "--window-size=800,900")


def test_label_videos_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 10)
    browser.get(server.url)
    key_text = lambda: browser.find_element(By.ID, "key").text  # noqa: E731
    progress = lambda: browser.find_element(By.ID, "progress").text  # noqa: E731
    frame_src = "const i = document.getElementById('frame'); return i.complete && i.naturalWidth > 0 ? i.src : null"

    wait.until(lambda d: (d.execute_script(frame_src) or "").find(f"/frame/{KEYS[0]}/") >= 0)
    assert key_text() == KEYS[0] and f"({KEYS[0]})" in browser.find_element(By.ID, "prompt").text
    assert progress().startswith("0 labelled of 3")
    first = browser.execute_script(frame_src)
    wait.until(lambda d: d.execute_script(frame_src) not in (None, first))  # the frames loop
    browser.save_screenshot(str(tmp_path / "label_ui.png"))
    assert (tmp_path / "label_ui.png").stat().st_size > 1000

    browser.find_element(By.TAG_NAME, "body").send_keys("g")
    wait.until(lambda d: key_text() == KEYS[1])
    browser.find_element(By.ID, "bad").click()
    wait.until(lambda d: key_text() == KEYS[2])
    browser.find_element(By.TAG_NAME, "body").send_keys("s")
    wait.until(lambda d: key_text() == KEYS[0])  # the only unlabelled one was skipped, so it moves on round

    assert progress().startswith("2 labelled of 3")
    lines = server.labels_path.read_text().splitlines()
    assert [(e["key"], e["label"], e["object_id"]) for e in map(json.loads, lines)] == [
        (KEYS[0], 1, f"object-{KEYS[0]}"), (KEYS[1], 0, f"object-{KEYS[1]}")]
    assert all(json.loads(line)["time"].endswith("+00:00") for line in lines)
    assert read_labels(server.labels_path) == {KEYS[0]: 1, KEYS[1]: 0}
    assert browser.find_element(By.ID, "error").text == ""


def test_api_rejects_bad_input_and_serves_frames(server):
    for payload, message in [({"key": KEYS[0], "label": "great"}, "must be one of ['bad', 'good']"),
                             ({"key": "nope", "label": "good"}, "unknown video key"),
                             (["not", "an", "object"], "expected a JSON object")]:
        status, body = post(server.url, payload)
        assert status == 400 and message in body["error"]
    assert not server.labels_path.exists()

    with urllib.request.urlopen(server.url + "api/videos", timeout=10) as response:
        listing = json.loads(response.read())
    assert [v["key"] for v in listing["videos"]] == KEYS and listing["labelled"] == 0
    assert listing["videos"][1]["prompt"] == f"a (40, 160, 40) ball ({KEYS[1]})"
    with urllib.request.urlopen(server.url + f"frame/{KEYS[1]}/3.png", timeout=10) as response:
        frame = np.asarray(Image.open(io.BytesIO(response.read())))
    assert frame.shape == (32, 32, 3)
    assert (frame[0, 0] == 255).all() and (frame[16, 11] == (40, 160, 40)).all()  # composited on white
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(server.url + f"frame/{KEYS[1]}/16.png", timeout=10)

    assert post(server.url, {"key": KEYS[2], "label": "bad"}) == (
        200, {"key": KEYS[2], "label": 0, "labelled": 1, "total": 3})
    assert read_labels(server.labels_path) == {KEYS[2]: 0}


def test_read_labels_last_line_wins_and_names_bad_lines(tmp_path):
    path = tmp_path / "labels.jsonl"
    assert read_labels(path, missing_ok=True) == {}
    with pytest.raises(FileNotFoundError, match="label-ui"):
        read_labels(path)
    path.write_text('{"key": "a", "label": 1}\n\n{"key": "b", "label": 0}\n{"key": "a", "label": 0}\n')
    assert read_labels(path) == {"a": 0, "b": 0}
    path.write_text('{"key": "a", "label": 1}\n{"key": "b", "label": "good"}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl:2: label must be"):
        read_labels(path)
    path.write_text('{"key": "a", "label": 1}\n\n{"key": "b", "lab\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl:3: not JSON"):
        read_labels(path)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty.*shard-\*\.tar"):
        LabelServer(tmp_path / "empty", tmp_path / "labels.jsonl")


# ---------------------------------------------------------------- the API's guards


def request(server: LabelServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, send_body: bool = True) -> tuple[int, dict, bytes]:
    """One raw request (headers exactly as given: no Host or Content-Length is added unless named here when
    `send_body` is False) -> (status, response headers, response body); a dropped connection raises."""
    port = server._httpd.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        if send_body:
            connection.request(method, path, body=body, headers=headers)
        else:  # headers only: the server must answer without waiting for a body
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def label_request(server: LabelServer, payload, **headers) -> tuple[int, dict]:
    """POST /api/label with the page's JSON type and token unless `headers` overrides them (None drops one)."""
    base = {"Content-Type": "application/json", "X-Label-Token": page_token(server.url)}
    headers = {k: v for k, v in {**base, **headers}.items() if v is not None}
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, raw = request(server, "POST", "/api/label", body, headers)
    return status, json.loads(raw)


def test_another_site_cannot_write_labels(server):
    port = server._httpd.server_address[1]
    good = json.dumps({"key": KEYS[0], "label": "good"}).encode()
    # a cross-site <form enctype="text/plain"> or no-cors fetch: text/plain, a foreign Origin, no token
    status, _, raw = request(server, "POST", "/api/label", good,
                             {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403 and "Origin 'http://evil.example' is not this server's origin" in json.loads(raw)["error"]
    for headers, status_wanted, message in [
            ({"Content-Type": "text/plain"}, 415, "Content-Type must be application/json, got 'text/plain'"),
            ({"Content-Type": None}, 415, "Content-Type must be application/json"),
            ({"X-Label-Token": None}, 403, "missing or wrong X-Label-Token header"),
            ({"X-Label-Token": "guessed"}, 403, "missing or wrong X-Label-Token header"),
            ({"Origin": "null"}, 403, "Origin 'null'"),  # a sandboxed frame or a file:// page
            ({"Origin": f"http://localhost:{port}"}, 403, "not this server's origin"),  # origin differs from Host
    ]:
        assert label_request(server, {"key": KEYS[0], "label": "good"}, **headers)[0] == status_wanted, headers
        assert message in label_request(server, {"key": KEYS[0], "label": "good"}, **headers)[1]["error"]
    assert not server.labels_path.exists()

    # the page itself: same origin, JSON, its token (the page can send it; no other site can read it)
    html = request(server, "GET", "/")[2].decode()
    assert f'content="{server.token}"' in html and '"X-Label-Token": TOKEN' in html
    assert label_request(server, {"key": KEYS[0], "label": "good"}, Origin=f"http://127.0.0.1:{port}")[0] == 200
    assert label_request(server, {"key": KEYS[1], "label": "bad"},  # charset parameter allowed
                         **{"Content-Type": "application/json; charset=utf-8"})[0] == 200
    assert read_labels(server.labels_path) == {KEYS[0]: 1, KEYS[1]: 0}
    # no other site may frame the page and steer the labeller's clicks
    _, headers, _ = request(server, "GET", "/")
    assert headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    with LabelServer(server.videos[KEYS[0]]["shard"].parent, server.labels_path) as other:
        assert other.token != server.token  # a new token each run


def test_a_foreign_host_name_is_refused(server):
    """DNS rebinding: evil.example re-resolved to 127.0.0.1 reaches the server with Host evil.example:PORT."""
    port = server._httpd.server_address[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
        for path in ("/", "/api/videos", f"/frame/{KEYS[0]}/0.png"):
            status, _, raw = request(server, "GET", path, headers={"Host": host})
            assert status == 403, (host, path)
            assert f"Host {host!r} is not this server's address; open the page at {server.url}" in \
                json.loads(raw)["error"]
        status, _, raw = request(server, "POST", "/api/label", json.dumps({"key": KEYS[0], "label": "good"}).encode(),
                                 {"Host": host, "Content-Type": "application/json",
                                  "X-Label-Token": page_token(server.url)})
        assert status == 403 and "is not this server's address" in json.loads(raw)["error"]
    assert not server.labels_path.exists()
    assert request(server, "GET", "/api/videos", headers={"Host": ""})[0] == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}"):
        assert request(server, "GET", "/api/videos", headers={"Host": host})[0] == 200


def test_odd_fields_are_a_400_naming_the_problem(server):
    for payload, message in [
            ({"key": ["vid0000"], "label": "good"}, '"key" must be a video key (a non-empty string'),
            ({"key": 7, "label": "good"}, '"key" must be a video key'),
            ({"key": {"a": 1}, "label": "good"}, '"key" must be a video key'),
            ({"key": "", "label": "good"}, '"key" must be a video key'),
            ({"label": "good"}, '"key" must be a video key'),
            ({"key": KEYS[0], "label": 1}, '"label" must be one of [\'bad\', \'good\'] (a string), got 1'),
            ({"key": KEYS[0], "label": ["good"]}, '"label" must be one of'),
            ({"key": KEYS[0], "label": {"good": 1}}, '"label" must be one of'),
            ({"key": KEYS[0], "label": None}, '"label" must be one of'),
            ({"key": KEYS[0], "label": "good", "extra": 1}, "unexpected fields ['extra']"),
            ([KEYS[0], "good"], "expected a JSON object"),
            ("good", "expected a JSON object"),
            (None, "expected a JSON object"),
            (b"", "body is not JSON"),
            (b"{not json", "body is not JSON"),
            (b'{"key": "\xff\xfe", "label": "good"}', "body is not JSON"),  # not UTF-8
            (b"[" * 60000, "body is not JSON"),  # too deep for the parser
    ]:
        status, body = label_request(server, payload)
        assert status == 400 and message in body["error"], (payload, body)
    assert not server.labels_path.exists()
    assert label_request(server, {"key": KEYS[0], "label": "good"}) == (
        200, {"key": KEYS[0], "label": 1, "labelled": 1, "total": 3})  # the server still serves


def test_body_length_is_required_and_capped(server):
    headers = {"Content-Type": "application/json", "X-Label-Token": page_token(server.url)}
    for extra, status_wanted, message in [
            ({}, 411, "a Content-Length header is required"),
            ({"Transfer-Encoding": "chunked"}, 411, "chunked bodies are not accepted"),
            ({"Content-Length": "abc"}, 400, "Content-Length must be a whole number of bytes, got 'abc'"),
            ({"Content-Length": "-5"}, 400, "Content-Length must be a whole number"),
            ({"Content-Length": "1e3"}, 400, "Content-Length must be a whole number"),
            ({"Content-Length": "65537"}, 413, "body of 65537 bytes is over the 65536-byte limit"),
            ({"Content-Length": "9" * 5000}, 413, "over the 65536-byte limit"),
    ]:  # headers only: a refused request must be answered without reading (or waiting for) any body
        status, response_headers, raw = request(server, "POST", "/api/label", headers={**headers, **extra},
                                                send_body=False)
        assert status == status_wanted and message in json.loads(raw)["error"], (extra, raw)
        assert response_headers["Connection"] == "close"
    big = json.dumps({"key": KEYS[0], "label": "good", "pad": "x" * (label_ui.MAX_BODY)}).encode()
    status, _, raw = request(server, "POST", "/api/label", big, headers)
    assert status == 413 and "over the 65536-byte limit" in json.loads(raw)["error"]
    # a body shorter than its Content-Length (the client stopped sending) is a 400, not a hang or a crash
    port = server._httpd.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"X-Label-Token: {server.token}\r\nContent-Length: 100\r\n\r\n".encode()
                     + b'{"key": "vid0000", "label": "good"}')
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 400") and b"body ended after 35 of the 100 bytes" in answer
    assert not server.labels_path.exists()


@pytest.mark.parametrize("tail, kept", [
    (b'{"key": "vid0001", "lab', [("vid0000", 1)]),  # cut mid-record: dropped
    ('{"key": "vid0001", "label": 0, "prompt": "caf\u00e9"}'.encode()[:-5], [("vid0000", 1)]),
    ('{"key": "vid0001", "label": 0, "note": "\u00e9"}'.encode()[:-4], [("vid0000", 1)]),  # cut inside a character
    (b'{"key": "vid0001", "label": 0}', [("vid0000", 1), ("vid0001", 0)]),  # whole, newline missing: kept
])
def test_a_labels_file_cut_by_a_kill_is_repaired_on_start(shards, tmp_path, capsys, tail, kept):
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b'{"key": "vid0000", "label": 1}\n' + tail)
    with LabelServer(shards, labels) as server:
        assert server.labels == dict(kept)
        assert "label-ui: " + str(labels) in capsys.readouterr().err
        assert post(server.url, {"key": KEYS[2], "label": "bad"})[0] == 200
    lines = labels.read_text(encoding="utf-8").splitlines()
    assert [(e["key"], e["label"]) for e in map(json.loads, lines)] == [*kept, (KEYS[2], 0)]
    with LabelServer(shards, labels):  # a whole file is left alone, silently
        assert "label-ui" not in capsys.readouterr().err


def test_repair_jsonl_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    assert repair_jsonl_tail(path) is None and not path.exists()  # missing: nothing made
    for before, after, said in [(b"", b"", None), (b'{"a": 1}\n', b'{"a": 1}\n', None),
                                (b'{"a": 1}\n{"b"', b'{"a": 1}\n', "dropped a cut last line (4 bytes"),
                                (b'{"b": 2', b"", "dropped a cut last line"),
                                (b'{"a": 1}\n{"b": 2}', b'{"a": 1}\n{"b": 2}\n', "added the missing newline")]:
        path.write_bytes(before)
        result = repair_jsonl_tail(path)
        assert path.read_bytes() == after and (result is None if said is None else said in result), before
        assert repair_jsonl_tail(path) is None  # repaired once


def test_listening_beyond_loopback_warns(shards, tmp_path, capsys, monkeypatch):
    for address in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert label_ui.exposure_warning(address, 8765) is None
    assert "listening on all addresses (port 8765), not on loopback" in label_ui.exposure_warning("0.0.0.0", 8765)
    assert "Use --host 127.0.0.1" in label_ui.exposure_warning("192.168.1.5", 8765)
    with LabelServer(shards, tmp_path / "labels.jsonl"):
        assert "WARNING" not in capsys.readouterr().err  # the default loopback bind is quiet
    # the server warns about the address it is bound to (bound to loopback here, so no port is opened to others)
    monkeypatch.setattr(label_ui, "_is_loopback", lambda address: address != "127.0.0.1")
    with LabelServer(shards, tmp_path / "labels.jsonl") as server:
        port = server._httpd.server_address[1]
        err = capsys.readouterr().err
    assert f"WARNING: label-ui is listening on 127.0.0.1 (port {port}), not on loopback" in err
