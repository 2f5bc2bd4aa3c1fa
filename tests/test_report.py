"""report.html of `evaluate`: every picture it links exists and is what it says (sizes, an animated turntable,
a mesh render and its file), data strings are escaped, the cap on objects is said, and a real headless
Chromium shows every picture."""

import html
import html.parser
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from test_metrics import SIZE, tiny_lrm

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands.evaluate import evaluate
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder
from vfusion3d_lightning.data.schema import ShardWriter
from vfusion3d_lightning.evaluation import evaluation_views, held_out_samples, seeded_input_view, turntable_cameras
from vfusion3d_lightning.evaluation_report import MESH_SIZE, TRUTH_VIEWS, TURNTABLE_FRAMES, folder_name
from vfusion3d_lightning.geometry.mesh import density_grid, suggest_threshold
from vfusion3d_lightning.io import on_white, to_uint8_images

EVIL = "<script>alert(1)</script>"
RENDER = 16
KWARGS = dict(clip="none", lpips_random_backbone=True, input_size=56, render_size=RENDER, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 procedural assets rendered as uniform32; in the shards the first object's id and prompt carry a
    script tag and the second has a prompt with markup (the renders' own assets stay the ground truth)."""
    root = tmp_path_factory.mktemp("report_data")
    write_assets(root / "assets", 3, seed=3, progress=False)
    render_folder(root / "assets", root / "plain", RenderSettings(views="uniform32", resolution=SIZE), workers=1,
                  shard_size=3, progress=False)
    samples = list(held_out_samples(str(root / "plain")))
    samples[0].object_id, samples[0].prompt = f"{EVIL}&co", f"a chair {EVIL}"
    samples[1].prompt = 'a "red" <b>table</b> & lamp'
    with ShardWriter(root / "shards", maxcount=8) as writer:
        for sample in samples:
            writer.write_sample(sample)
    return root


class ReportParser(html.parser.HTMLParser):
    """The page's img sources, link targets and script elements."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs["src"], attrs.get("alt", "")))
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "script":
            self.scripts += 1


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    """evaluate with geometry of two checkpoints, pictures of 2 of the 3 objects: at a density level that the
    first one's random field crosses (meshes) and the second one's does not (no surface)."""
    folder = tmp_path_factory.mktemp("report_run")
    model = tiny_lrm(seed=1)
    sources = [model.save_pretrained(folder / "tiny"), tiny_lrm(seed=2).save_pretrained(folder / "other")]
    first = next(iter(held_out_samples(str(data / "shards"))))
    views = evaluation_views(first, seeded_input_view(0, first.object_id, 32), 56)
    with torch.no_grad():
        level = suggest_threshold(density_grid(model, model(views["input_image"][None],
                                                            views["source_camera"][None]), 24), 0.5)
    out = folder / "eval"
    results = evaluate([str(s) for s in sources], str(data / "shards"), out, assets=data / "assets",
                       mesh_resolution=24, mesh_threshold=level, report_objects=2, **KWARGS)
    return out, results


def test_report_links_every_picture_and_escapes_the_data(report):
    out, results = report
    page = (out / "report.html").read_text()
    parser = ReportParser()
    parser.feed(page)
    assert parser.scripts == 0 and EVIL not in page  # the ids and prompts are text, not markup
    assert html.escape(f"{EVIL}&co") in page and html.escape("a chair " + EVIL) in page
    assert html.escape('a "red" <b>table</b> & lamp') in page and "<b>table" not in page
    assert "the first 2 of 3 objects scored" in page
    for name in ("tiny", "other"):  # the summary table: the numbers of summary.md
        row = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "".join(f"<td>{html.escape(c)}</td>" for c in cells) in page
    sources = [src for src, _ in parser.images]
    assert all(not src.startswith(("/", "http", "file:")) and ".." not in src for src in sources + parser.links)
    assert sorted(s for s in sources if s.startswith("plots/")) == sorted(
        f"plots/{p.name}" for p in (out / "plots").iterdir())
    ids = [s.object_id for s in results["tiny"]]
    for index, object_id in enumerate(ids[:2]):
        truth = Path("report/ground-truth") / folder_name(index, object_id)
        input_view = results["tiny"][index].input_view
        shown = [s for s in sources if s.startswith(truth.as_posix() + "/")]
        assert shown[0] == f"{truth.as_posix()}/input.png" and len(shown) == 1 + TRUTH_VIEWS
        views = [int(s[-6:-4]) for s in shown[1:]]
        assert input_view not in views and len(set(views)) == TRUTH_VIEWS
        for name in ("tiny", "other"):
            folder = f"report/checkpoints/{name}/{folder_name(index, object_id)}"
            assert [int(s[-6:-4]) for s in sources if s.startswith(folder + "/view_")] == views  # same cameras
            assert f"{folder}/turntable.webp" in sources
            if name == "tiny":
                assert f"{folder}/mesh.png" in sources and f"{folder}/mesh.glb" in parser.links
                assert len(trimesh.load(out / folder / "mesh.glb", force="mesh").faces) > 10
            else:  # the other random field has no surface at the level: said, not drawn
                assert f"{folder}/mesh.png" not in sources and f"{folder}/mesh.glb" not in parser.links
    assert [s.no_surface for s in results["other"]] == [True] * 3 and not any(s.no_surface for s in results["tiny"])
    assert page.count("no surface at the mesh threshold") == 2
    assert not any(folder_name(2, ids[2]) in s for s in sources)  # past the cap: scored, not shown
    assert len(results["tiny"]) == 3
    for src in sources:
        with Image.open(out / src) as picture:
            if src.startswith("plots/"):
                assert picture.format == "PNG"
            elif src.endswith("mesh.png"):
                assert picture.size == (2 * MESH_SIZE, MESH_SIZE)
                drawn = (np.asarray(picture.convert("RGB")) < 250).any(-1)
                assert 0.05 < drawn[:, :MESH_SIZE].mean() < 0.95 and 0.05 < drawn[:, MESH_SIZE:].mean() < 0.95
            elif src.endswith(".webp"):
                assert picture.size == (RENDER, RENDER) and picture.is_animated
                assert picture.n_frames == TURNTABLE_FRAMES
            elif src.endswith("input.png"):  # what the encoder was given, at its size
                assert picture.format == "PNG" and picture.size == (KWARGS["input_size"],) * 2
            else:
                assert picture.format == "PNG" and picture.size == (RENDER, RENDER)


def test_the_truth_pictures_are_the_shards_views(report, data):
    out, results = report
    sample = next(iter(held_out_samples(str(data / "shards"))))
    scores = results["tiny"][0]
    folder = out / "report/ground-truth" / folder_name(0, sample.object_id)
    view = sorted(folder.glob("view_*.png"))[0]
    index = int(view.stem[-2:])
    expected = to_uint8_images(torch.nn.functional.interpolate(on_white(sample.images[index:index + 1]), RENDER,
                                                               mode="bilinear", antialias=True))[0]
    got = np.asarray(Image.open(view).convert("RGB")).astype(int)
    assert np.abs(got - expected).mean() < 8 and scores.object_id == sample.object_id


def test_report_off_and_a_bad_cap(data, tmp_path):
    folder = tiny_lrm().save_pretrained(tmp_path / "tiny")
    (tmp_path / "again" / "report" / "old").mkdir(parents=True)  # an earlier run's pictures
    (tmp_path / "again" / "report" / "old" / "view_00.png").write_bytes(b"stale")
    evaluate([str(folder)], str(data / "shards"), tmp_path / "again", geometry=False, max_objects=1, **KWARGS)
    files = sorted(p.relative_to(tmp_path / "again").as_posix() for p in (tmp_path / "again").rglob("*"))
    assert "report/old" not in files and not [f for f in files if ".partial" in f]  # replaced, nothing left over
    assert "report.html" in files and len([f for f in files if f.startswith("report/checkpoints/tiny/")]) == 6
    assert main(["evaluate", "--checkpoint+", str(folder), "--shards", str(data / "shards"), "--out",
                 str(tmp_path / "off"), "--geometry", "false", "--max_objects", "1", "--report", "false",
                 "--clip", "none", "--lpips_random_backbone", "true", "--input_size", "56", "--render_size",
                 str(RENDER), "--device", "cpu"]) == 0
    assert (tmp_path / "off" / "summary.md").is_file()
    assert not (tmp_path / "off" / "report.html").exists() and not (tmp_path / "off" / "report").exists()
    with pytest.raises(ValueError, match="report_objects must be >= 0, got -1"):
        evaluate([str(folder)], str(data / "shards"), tmp_path / "bad", report_objects=-1, **KWARGS)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("input_view", [0, 9, 20, 31])  # one per ring of the rig, -15 to 75 degrees up
def test_the_turntable_starts_at_the_input_view_and_circles_the_worlds_up_axis(data, input_view):
    sample = next(iter(held_out_samples(str(data / "shards"))))
    views = evaluation_views(sample, input_view, 56)
    cameras = turntable_cameras(views, 12)
    torch.testing.assert_close(cameras[0], views["render_cameras"][input_view], atol=1e-4, rtol=0)
    positions = cameras[:, :16].unflatten(-1, (4, 4))[:, :3, 3].double()
    world = positions @ views["world_rotation"]  # p_world = R^T p: rows p @ R
    radius = float(np.linalg.norm(sample.cam2world[input_view][:3, 3]))
    torch.testing.assert_close(world.norm(dim=1), torch.full((12,), radius, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(world[:, 2], world[:1, 2].expand(12), atol=1e-4, rtol=0)  # one height
    steps = torch.atan2(world[:, 1], world[:, 0]).diff().remainder(2 * np.pi)
    torch.testing.assert_close(steps, torch.full((11,), 2 * np.pi / 12, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.fixture
def browser(chromium):
    return chromium("--disable-gpu", "--window-size=1400,1200", "--allow-file-access-from-files")


def test_the_report_shows_every_picture_in_a_browser(report, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    out, _ = report
    browser.get((out / "report.html").resolve().as_uri())
    loaded = ("return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    WebDriverWait(browser, 20).until(lambda d: all(ok and width > 0 for _, ok, width in d.execute_script(loaded)))
    images = browser.execute_script(loaded)
    plots = len(list((out / "plots").iterdir()))
    # per object: input and truth, then tiny's views, turntable and mesh, then other's views and turntable
    assert len(images) == plots + 2 * (1 + TRUTH_VIEWS + (TRUTH_VIEWS + 2) + (TRUTH_VIEWS + 1))
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    assert browser.title == "VFusion3D evaluation"
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1400  # the grid fits
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 150)  # the whole page in one screenshot, to look at
    browser.save_screenshot(str(tmp_path / "report.png"))
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.height >= height and len(shot.convert("L").getcolors(2**16) or []) > 50  # not a blank page
