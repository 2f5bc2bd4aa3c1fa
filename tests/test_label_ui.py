"""The labelling page: a real headless Chromium labels videos through the page, plus the HTTP API and labels file."""

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfusion3d_lightning.commands.label_ui import LabelServer
from vfusion3d_lightning.data.labels import read_labels
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
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


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url + "api/label", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs Selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver path below, Selenium Manager downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=800,900", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


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
    for payload, message in [({"key": KEYS[0], "label": "great"}, "label must be"),
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
