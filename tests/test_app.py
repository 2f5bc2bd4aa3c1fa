"""The demo page (`vfusion3d-lightning app`): a real headless Chromium uploads an image, presses Generate and gets
the preprocessed input, the turntable video, the mesh in the 3D viewer and GLB/OBJ/MP4 downloads, from a tiny
random-weights LRM; the page loads nothing from outside the server; loopback by default."""

import inspect
import io
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands import app as app_command
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.geometry.mesh import density_grid
from vfusion3d_lightning.inference import ImageTo3D
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free loopback port with a tiny random LRM, and an RGBA input image."""
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny")).eval()
    checkpoint = model.save_pretrained(root / "lrm")
    picture = np.zeros((64, 64, 4), np.uint8)
    picture[16:48, 20:44] = (200, 40, 40, 255)
    Image.fromarray(picture, "RGBA").save(root / "cutout.png")
    # a density level the random field crosses, so the mesh has a surface
    planes = ImageTo3D(model, input_size=56).planes(preprocess(root / "cutout.png", 56, background="alpha"))
    threshold = float(density_grid(model, planes, 16).median())
    page = app_command.start(str(checkpoint), "127.0.0.1", free_port(), root / "out", examples=2, frames=4,
                             render_size=32, frames_per_batch=4, fps=4, mesh_resolution=24, mesh_threshold=threshold,
                             input_size=56, border_ratio=0.2, background="auto", device="cpu", dtype="float32",
                             block=False)
    yield page, root
    page.close()


@pytest.fixture
def browser(chromium):
    return chromium("--window-size=1400,1000", "--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def drawn(element) -> bool:
    """Whether an element shows a picture: its pixels are not one flat colour."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), np.float32)
    return pixels.std() > 10


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_generate_in_the_browser_shows_and_serves_video_and_mesh(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page, root = served
    url = page.local_url
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))[0]
    upload.send_keys(str(root / "cutout.png"))  # the hidden file input behind the upload area
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    browser.find_element(By.ID, "generate").click()

    links = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#downloads a[href]"))
    video = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turntable video[src]"))[0]
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#processed img[src]"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#mesh-viewer canvas"))
    wait.until(lambda d: drawn(d.find_element(By.CSS_SELECTOR, "#mesh-viewer canvas")))  # the mesh, not a blank
    browser.save_screenshot(str(root / "app.png"))

    # the video element plays the MP4 the server wrote; the downloads serve the files themselves
    assert fetch(urllib.parse.urljoin(url, video.get_attribute("src")))[4:8] == b"ftyp"
    files = {Path(urllib.parse.unquote(urllib.parse.urlsplit(a.get_attribute("href")).path)).name:
             fetch(urllib.parse.urljoin(url, a.get_attribute("href"))) for a in links}
    # the OBJ comes with the material and texture it names
    assert sorted(files) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.png", "turntable.mp4"]
    assert files["mesh.glb"][:4] == b"glTF" and files["turntable.mp4"][4:8] == b"ftyp"
    assert b"\nf " in files["mesh.obj"] and b"\nv " in files["mesh.obj"] and b"map_Kd mesh.png" in files["mesh.mtl"]
    # the mesh is UV-textured: the GLB carries a base-colour texture
    glb = trimesh.load(io.BytesIO(files["mesh.glb"]), file_type="glb", force="mesh")
    assert glb.visual.uv is not None and glb.visual.material.baseColorTexture is not None
    # the request's own folder holds the same files
    [request] = (root / "out" / "requests").iterdir()
    assert sorted(p.name for p in request.iterdir()) == ["input.png", *sorted(files)]
    assert (request / "mesh.glb").read_bytes() == files["mesh.glb"]
    # nothing came from outside the server (an offline machine would hang on a CDN)
    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(url))
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [r for r in resources if not r.startswith((origin, "blob:", "data:"))]
    assert resources and not outside, outside
    assert browser.find_elements(By.CSS_SELECTOR, ".toast-body.error") == []


def test_an_image_without_an_object_is_an_error_on_the_page(served):
    import gradio as gr

    page, root = served
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(root / "empty.png")  # fully transparent
    [handler] = [f.fn for f in page.fns.values() if f.name == "generate"]
    for picture, says in [(None, "upload an image first"), (str(root / "empty.png"), "mask is empty")]:
        with pytest.raises(gr.Error, match=says):
            handler(picture)


def test_examples_are_procedural_front_views(served):
    _, root = served
    examples = sorted((root / "out" / "examples").glob("example_*.png"))
    assert len(examples) == 2
    picture = np.asarray(Image.open(examples[0]))
    assert picture.shape == (256, 256, 4) and 0 < (picture[..., 3] > 0).mean() < 1  # an object, with a background


def test_default_host_is_loopback_and_other_hosts_warn(capsys):
    assert inspect.signature(app_command.app).parameters["host"].default == "127.0.0.1"
    with pytest.raises(SystemExit):
        main(["app", "--print_config"])
    assert "host: 127.0.0.1" in capsys.readouterr().out.splitlines()
    for host in ("127.0.0.1", "::1", "localhost"):
        assert app_command.exposure_warning(host, 7860) is None
    assert "listening on all addresses (port 7860), not on loopback" in app_command.exposure_warning("0.0.0.0", 7860)
    assert "Use --host 127.0.0.1" in app_command.exposure_warning("192.168.1.5", 7860)


def test_missing_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'vfusion3d-lightning\[app\]'"):
        main(["app", "--checkpoint", "missing"])
    monkeypatch.setattr(sys, "argv", ["vfusion3d-lightning", "app", "--checkpoint", "missing"])
    from vfusion3d_lightning.cli import console_main

    assert console_main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vfusion3d-lightning: error: the app (vfusion3d-lightning app) needs gradio, which is not "
                   "installed: pip install 'vfusion3d-lightning[app]'"]


def test_no_surface_keeps_the_turntable_and_warns(served):
    """An under-trained model has no surface at the threshold: the page still gets the input and the video."""
    _, root = served
    model = LRM.from_pretrained(root / "lrm").eval()
    page = app_command.build_page(ImageTo3D(model, input_size=56), root / "no-surface", [], frames=4, render_size=32,
                                  frames_per_batch=4, fps=4, mesh_resolution=16, mesh_threshold=1e9)
    [handler] = [f.fn for f in page.fns.values() if f.name == "generate"]
    with pytest.warns(UserWarning, match=r"no surface at density threshold .* e\.g\. \d"):  # a toast on the page
        picture, video, mesh, downloads = handler(str(root / "cutout.png"))
    assert mesh is None and downloads == [video]
    assert Path(picture).is_file() and Path(video).read_bytes()[4:8] == b"ftyp"
    assert not list(Path(video).parent.glob("mesh.*"))
