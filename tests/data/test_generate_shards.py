"""`vfusion3d-lightning generate`: inputs from folders and files, valid synthetic shards, exact-once resume, the
same bytes from one process and from two (DDP over gloo)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.datamodules import OrbitClip
from vfusion3d_lightning.data.generate_shards import read_inputs, sample_seed
from vfusion3d_lightning.data.schema import complete_shards, decode_sample, keys_in_shards
from vfusion3d_lightning.models.video import SamplerSettings, VideoDiffusionModel
from vfusion3d_lightning.training.generation import PLAN_NAME, generate_shards, predict_trainer


def write_images(folder, count: int, prompts: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:48, :48]
    for i in range(count):
        rgba = np.zeros((48, 48, 4), dtype=np.uint8)
        rgba[..., :3] = (40 * i % 255, 120, 200)
        rgba[..., 3] = np.where((yy - 24) ** 2 + (xx - 20 - i) ** 2 < 150, 255, 0)
        Image.fromarray(rgba).save(folder / f"object {i}.png")
        if prompts:
            (folder / f"object {i}.txt").write_text(f"a thing number {i}\n")
    return [f"object_{i}" for i in range(count)]


def read_shards(folder) -> dict:
    import webdataset as wds

    samples = {}
    for raw in wds.WebDataset([str(p) for p in complete_shards(folder)], shardshuffle=False):
        sample = decode_sample(raw)
        assert sample.key not in samples, f"{sample.key} written twice"
        samples[sample.key] = sample
    return samples


def child_process(pid: int, env_entry: str) -> int | None:
    """The pid of a child of process `pid` started with `env_entry` (e.g. `LOCAL_RANK=1`) in its environment."""
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            with open(f"/proc/{name}/environ", "rb") as environ:
                entries = environ.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or not ours to read
        if parent == pid and env_entry.encode() in entries:
            return int(name)
    return None


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoDiffusionModel.build("tiny-svd")


SETTINGS = SamplerSettings(num_inference_steps=2)


def test_inputs_come_from_folders_jsonl_and_csv(tmp_path):
    keys = write_images(tmp_path / "images", 2)
    inputs = read_inputs(tmp_path / "images")
    assert [i.key for i in inputs] == keys and inputs[1].prompt == "a thing number 1"
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"image": "images/object 0.png", "prompt": "a cup", "id": "cup.1"}) + "\n\n"
        + json.dumps({"image": str(tmp_path / "images" / "object 1.png"), "prompt": "a mug"}) + "\n")
    inputs = read_inputs(tmp_path / "list.jsonl")
    assert [(i.key, i.prompt) for i in inputs] == [("cup_1", "a cup"), ("object_1", "a mug")]
    (tmp_path / "list.csv").write_text("image,prompt\nimages/object 0.png,\"a cup, blue\"\n")
    assert read_inputs(tmp_path / "list.csv")[0].prompt == "a cup, blue"


@pytest.mark.parametrize("content, message", [
    ('{"image": "missing.png", "prompt": "x"}', r"list.jsonl:1: image .*missing.png does not exist"),
    ('{"prompt": "x"}', "list.jsonl:1: needs an 'image' field"),
    ('{"image": ', "list.jsonl:1: not JSON"),
    ('{"image": "a.png", "id": "k"}\n{"image": "a.png", "id": "k"}', r"same sample key \['k'\]"),
])
def test_bad_inputs_name_the_line_and_the_fix(tmp_path, content, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "list.jsonl").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_inputs(tmp_path / "list.jsonl")
    with pytest.raises(FileNotFoundError, match="must be a folder of images, a .jsonl or a .csv"):
        read_inputs(tmp_path / "nothing.txt")


def test_generate_command_writes_valid_synthetic_shards(tmp_path, model):
    keys = write_images(tmp_path / "images", 2)
    model.save_pretrained(tmp_path / "model")
    code = main(["generate", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "images"), "--out",
                 str(tmp_path / "out"), "--size", "32", "--steps", "2", "--batch_size", "2", "--seed", "3",
                 "--trainer.accelerator", "cpu", "--num_workers", "0"])
    assert code == 0
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == keys
    sample = samples["object_1"]
    assert sample.source == "synthetic" and sample.prompt == "a thing number 1" and sample.num_views == 16
    assert sample.images.shape == (16, 32, 32, 4) and sample.images[..., :3].std() > 0
    assert sample.extra["seed"] == sample_seed(3, "object_1")
    assert sample.extra["sampler"]["num_inference_steps"] == 2 and sample.extra["sampler"]["num_frames"] == 16
    clip = OrbitClip(16, 32)(sample, np.random.default_rng(0))  # usable as video training data again
    assert clip["frames"].shape == (16, 3, 32, 32)
    report = json.loads((tmp_path / "out" / "generate_report.json").read_text())
    assert report["written"] == 2 and not report["failed"]
    plan = json.loads((tmp_path / "out" / PLAN_NAME).read_text())
    assert plan["shards"] == [{"shard": 0, "keys": keys}]


def cpu():
    return predict_trainer(accelerator="cpu", progress=False)


class Interrupt(RuntimeError):
    pass


def test_an_interrupted_run_resumes_writing_each_prompt_exactly_once(tmp_path, model, monkeypatch):
    keys = write_images(tmp_path / "images", 5)
    inputs = read_inputs(tmp_path / "images")
    # the reference: one uninterrupted run
    generate_shards(model, inputs, tmp_path / "reference", SETTINGS, frame_size=32, batch_size=2, shard_size=2,
                    trainer=cpu(), progress=False)
    reference = read_shards(tmp_path / "reference")

    # a run that dies in its third batch, leaving the shard it was writing as .tar.partial
    calls = {"n": 0}
    forward = VideoDiffusionModel.forward

    def dying_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * SETTINGS.num_inference_steps:
            raise Interrupt("killed")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(VideoDiffusionModel, "forward", dying_forward)
    with pytest.raises(Interrupt):
        generate_shards(model, inputs, tmp_path / "out", SETTINGS, frame_size=32, batch_size=2, shard_size=2,
                        trainer=cpu(), progress=False)
    monkeypatch.setattr(VideoDiffusionModel, "forward", forward)
    first = keys_in_shards(complete_shards(tmp_path / "out"))
    assert sorted(k for ks in first.values() for k in ks) == keys[:4]
    (tmp_path / "out" / "shard-000002.tar.partial").write_bytes(b"truncated by a kill")

    report = generate_shards(model, inputs, tmp_path / "out", SETTINGS, frame_size=32, batch_size=2,
                             shard_size=2, trainer=cpu(), progress=False)
    assert report.skipped_existing == 4 and report.written == 1
    assert not list((tmp_path / "out").glob("*.partial"))
    resumed = read_shards(tmp_path / "out")
    assert sorted(resumed) == keys
    for key in keys:  # the same video as the uninterrupted run: the planned shards keep their batches
        assert np.array_equal(resumed[key].images, reference[key].images)


@pytest.mark.slow
def test_two_processes_write_the_same_shards_as_one(tmp_path, model):
    """`--trainer.devices 2` on the CPU: Lightning's DDP launcher starts a second process (gloo) running the same
    command; the planned shards are dealt over the ranks and each is written whole by one of them."""
    import subprocess
    import sys

    # Lightning gives each of 2 CPU ranks half the threads; a float sum split over other thread counts rounds
    # differently (pixels 1/255 apart), so both runs get one thread each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    write_images(tmp_path / "images", 5)
    model.save_pretrained(tmp_path / "model")
    def command(out, devices: int) -> list[str]:
        return [sys.executable, "-m", "vfusion3d_lightning.cli", "generate", "--model", str(tmp_path / "model"),
                "--inputs", str(tmp_path / "images"), "--out", str(out), "--size", "32", "--steps", "2",
                "--batch_size", "2", "--shard_size", "2", "--seed", "5", "--num_workers", "0", "--progress", "false",
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]

    def run(devices: int, out=None) -> str:
        done = subprocess.run(command(out or tmp_path / f"devices{devices}", devices), capture_output=True, text=True,
                              timeout=600, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    outputs = {}
    for devices in (1, 2):
        assert run(devices).count("generated 5, already present 0, failed 0") == 1  # printed by rank 0 only
        outputs[devices] = {p.name: p.read_bytes() for p in complete_shards(tmp_path / f"devices{devices}")}
    assert sorted(outputs[1]) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert outputs[1] == outputs[2]  # byte for byte
    report = json.loads((tmp_path / "devices2" / "generate_report.json").read_text())
    assert report["written"] == 5 and len(report["shards"]) == 3
    # both ranks killed (SIGKILL to the process group) once the first shard is whole; the rerun ends as one run.
    # Shard 2's input is a FIFO no one writes until then, so the job cannot end before the kill on any machine.
    import contextlib
    import signal
    import time

    killed = tmp_path / "killed"
    held = tmp_path / "images" / "object 4.png"
    original = held.read_bytes()
    held.unlink()
    os.mkfifo(held)
    job = subprocess.Popen(command(killed, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                           env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not complete_shards(killed) and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        held.unlink()
        held.write_bytes(original)
    assert 1 <= len(complete_shards(killed)) < 3, "no shard was whole before the deadline"
    (killed / "shard-000002.tar.partial").write_bytes(b"cut by the kill")  # as a rank in flight leaves it
    run(2, killed)
    assert {p.name: p.read_bytes() for p in complete_shards(killed)} == outputs[1]
    assert not list(killed.glob("*.partial"))

    # three new inputs: a new plan of two shards (3 and 4) after the complete ones, the same for one device and two
    write_images(tmp_path / "images", 8)
    assert "generated 3, already present 5, failed 0" in run(1)
    reference = {p.name: p.read_bytes() for p in complete_shards(tmp_path / "devices1")}
    assert sorted(reference)[-2:] == ["shard-000003.tar", "shard-000004.tar"]
    # rank 1 alone killed mid-job: rank 0 writes its shard (3) and then waits for rank 1 at a collective, which must
    # fail within seconds, not at gloo's 30-minute timeout. Rank 1's shard (4) is "object 7.png", made a FIFO no one
    # writes, so rank 1 is held reading its input until the kill, whatever the machine's speed.
    out, log = tmp_path / "devices2", tmp_path / "rank1_killed.log"
    image = tmp_path / "images" / "object 7.png"
    original = image.read_bytes()
    image.unlink()
    os.mkfifo(image)
    with log.open("w") as sink:
        job = subprocess.Popen(command(out, 2), stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "shard-000003.tar").is_file() and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        rank1 = child_process(job.pid, "LOCAL_RANK=1")
        assert rank1 and job.poll() is None, f"rank 1 is not running: {log.read_text()[-3000:]}"
        os.kill(rank1, signal.SIGKILL)
        try:
            code = job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still runs 60 s after rank 1 was killed: {log.read_text()[-3000:]}")
    finally:  # nothing left blocked on the FIFO, and the image back for the rerun
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        image.unlink()
        image.write_bytes(original)
    text = log.read_text()
    assert code != 0, text[-3000:]
    # gloo's error at rank 0's collective (closed or reset by peer: "... Check the logs of the remote worker"), or
    # Lightning's launcher ending rank 0 when it sees rank 1 gone
    assert "remote worker" in text or "terminated with code -9" in text, text[-3000:]
    assert {p.name: p.read_bytes() for p in complete_shards(out)} == {
        name: data for name, data in reference.items() if name != "shard-000004.tar"}
    # the rerun has one shard left, so rank 1 is dealt nothing (and must not leave rank 0 waiting)
    assert "generated 1, already present 7, failed 0" in run(2)
    assert {p.name: p.read_bytes() for p in complete_shards(out)} == reference
    assert not list(out.glob("*.partial"))
