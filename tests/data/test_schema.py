import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vfusion3d_lightning.data.schema import (
    SCHEMA_VERSION,
    SampleError,
    ShardWriter,
    complete_shards,
    decode_sample,
    encode_sample,
    keys_in_shards,
)


def read_raw(path):
    return list(wds.tarfile_samples(iter([{"url": str(path)}])))


def png_bytes(array, mode):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_round_trip_through_shards_is_exact(tmp_path, sample_factory):
    sample = sample_factory("obj1")
    with ShardWriter(tmp_path) as writer:
        writer.write_sample(sample)
    (shard,) = complete_shards(tmp_path)
    (raw,) = read_raw(shard)
    back = decode_sample(raw, require_cameras=True)
    assert back.key == "obj1" and back.object_id == "object-obj1" and back.source == "3d"
    assert np.array_equal(back.images, sample.images)
    assert np.allclose(back.cam2world, sample.cam2world) and np.allclose(back.intrinsics, sample.intrinsics)
    assert np.allclose(back.azimuths, sample.azimuths) and np.allclose(back.elevations, sample.elevations)
    assert back.prompt == "a red cube" and back.quality == pytest.approx(0.9)
    assert back.extra == {"renderer": "test"}


def test_jpeg_views_carry_exact_masks(sample_factory):
    sample = sample_factory("obj2")
    raw = encode_sample(sample, image_format="jpg")
    assert "000.jpg" in raw and "000.mask.png" in raw and "000.png" not in raw
    back = decode_sample(raw)
    assert np.array_equal(back.images[..., 3], sample.images[..., 3])
    assert np.abs(back.images[..., :3].astype(int) - sample.images[..., :3]).max() <= 8


def test_shards_written_by_hand_with_plain_webdataset_load(tmp_path):
    # what the README tells a user to write, with no code of ours
    path = tmp_path / "handmade-000000.tar"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = [200, 50, 50, 255]
    meta = {"schema": SCHEMA_VERSION, "object_id": "mug", "source": "synthetic", "num_views": 2, "width": 8,
            "height": 8, "image_format": "png",
            "cam2world": [np.eye(4).tolist(), np.eye(4).tolist()], "intrinsics": None, "elevations": [0.1, 0.1],
            "azimuths": [0.0, 3.14159], "prompt": "a mug", "quality": None}
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "mug", "json": json.dumps(meta), "000.png": png_bytes(rgba, "RGBA"),
                    "001.png": png_bytes(rgba, "RGBA")})
    (raw,) = read_raw(path)
    sample = decode_sample(raw)
    assert sample.num_views == 2 and sample.prompt == "a mug" and not sample.has_cameras
    assert np.array_equal(sample.images[1], rgba)
    with pytest.raises(SampleError, match="no cameras"):
        decode_sample(raw, require_cameras=True)


def test_bad_samples_say_precisely_what_is_wrong(sample_factory):
    good = encode_sample(sample_factory("obj3", n_views=4))
    truncated = {**good, "002.png": good["002.png"][:40]}
    with pytest.raises(SampleError, match=r"'obj3'.*002\.png cannot be decoded"):
        decode_sample(truncated)
    missing = {k: v for k, v in good.items() if k != "003.png"}
    with pytest.raises(SampleError, match=r"missing view files \['003.png'\]"):
        decode_sample(missing)
    meta = json.loads(good["json"])
    meta["cam2world"][1][0][3] = float("nan")
    with pytest.raises(SampleError, match=r"cam2world holds NaN or inf \(views \[1\]\)"):
        decode_sample({**good, "json": json.dumps(meta)})
    with pytest.raises(SampleError, match="missing its .json"):
        decode_sample({k: v for k, v in good.items() if k != "json"})
    meta = json.loads(good["json"])
    meta["schema"] = "other/2"
    with pytest.raises(SampleError, match="schema is 'other/2'"):
        decode_sample({**good, "json": json.dumps(meta)})
    meta = json.loads(good["json"])
    meta["width"] = 99
    with pytest.raises(SampleError, match="metadata says 99x24"):
        decode_sample({**good, "json": json.dumps(meta)})
    meta = json.loads(good["json"])
    meta["cam2world"][0] = np.diag([2.0, 2.0, 2.0, 1.0]).tolist()
    with pytest.raises(SampleError, match="not orthonormal"):
        decode_sample({**good, "json": json.dumps(meta)})
    with pytest.raises(SampleError, match="contain no dots"):
        encode_sample(sample_factory("bad.key"))


def test_writer_rotates_publishes_atomically_and_continues_numbering(tmp_path, sample_factory):
    with ShardWriter(tmp_path, maxcount=2) as writer:
        for i in range(5):
            writer.write_sample(sample_factory(f"a{i}", n_views=2))
    shards = complete_shards(tmp_path)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(tmp_path.glob("*.partial"))
    assert keys_in_shards(shards)[shards[2]] == ["a4"]
    with ShardWriter(tmp_path, maxcount=2) as writer:  # a resumed job appends after the last shard
        writer.write_sample(sample_factory("b0", n_views=2))
    assert complete_shards(tmp_path)[-1].name == "shard-000003.tar"
    with ShardWriter(tmp_path):  # nothing written: no empty shard appears
        pass
    assert len(complete_shards(tmp_path)) == 4
    with tarfile.open(complete_shards(tmp_path)[0]) as tar:
        assert sorted(tar.getnames())[:3] == ["a0.000.png", "a0.001.png", "a0.json"]


def test_a_full_disk_mid_shard_publishes_no_cut_shard(tmp_path, sample_factory):
    import errno

    with ShardWriter(tmp_path, maxcount=2) as writer:
        writer.write_sample(sample_factory("old0", n_views=2))
    before = complete_shards(tmp_path)[0].read_bytes()
    with pytest.raises(OSError, match="No space left"):
        with ShardWriter(tmp_path, maxcount=2) as writer:
            for i in range(4):
                if i == 3:  # the disk fills while the second shard's last sample is being written
                    stream = writer.tarstream.tarstream.fileobj

                    def full(data, write=stream.write):
                        write(data[: len(data) // 2])
                        raise OSError(errno.ENOSPC, "No space left on device")

                    stream.write = full
                writer.write_sample(sample_factory(f"new{i}", n_views=2))
    shards = complete_shards(tmp_path)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]  # the cut third shard is gone
    assert shards[0].read_bytes() == before  # what was there is untouched
    assert keys_in_shards(shards) == {shards[0]: ["old0"], shards[1]: ["new0", "new1"]}
    assert not list(tmp_path.glob("*.partial"))
    assert [decode_sample(raw).key for raw in read_raw(shards[1])] == ["new0", "new1"]


def with_meta(raw, **changes):
    meta = json.loads(raw["json"])
    meta.update(changes)
    return {**raw, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("change, message", [
    (lambda raw: {**raw, "json": b"[1, 2]"}, r"\.json holds a list, expected an object"),
    (lambda raw: {**raw, "json": b"null"}, r"\.json holds a NoneType"),
    (lambda raw: {**raw, "json": b'"obj"'}, r"\.json holds a str"),
    (lambda raw: {**raw, "json": b"[" * 100_000 + b"]" * 100_000}, r"\.json is not valid JSON \(RecursionError"),
    (lambda raw: with_meta(raw, quality="high"), r"field 'quality' must be a finite number or null, got str 'high'"),
    (lambda raw: with_meta(raw, quality=True), "field 'quality'"),
    (lambda raw: with_meta(raw, prompt={"text": "a cube"}), r"field 'prompt' must be a string or null, got dict"),
    (lambda raw: with_meta(raw, prompt=["a", "cube"]), "field 'prompt'"),
    (lambda raw: with_meta(raw, object_id={"id": 3}), "field 'object_id' must be a string"),
    (lambda raw: with_meta(raw, source=["3d"]), "field 'source' must be one of"),
    (lambda raw: with_meta(raw, num_views="4"), "field 'num_views' must be a positive integer, got str '4'"),
    (lambda raw: with_meta(raw, num_views=4.0), "field 'num_views'"),
    (lambda raw: with_meta(raw, num_views=True), "field 'num_views'"),
    (lambda raw: with_meta(raw, width="24"), "field 'width' must be a positive integer"),
    (lambda raw: with_meta(raw, height=None), "field 'height'"),
    (lambda raw: with_meta(raw, image_format=["png"]), "field 'image_format' must be one of"),
    (lambda raw: with_meta(raw, cam2world="identity"), "field 'cam2world' is not numeric"),
    (lambda raw: with_meta(raw, intrinsics=[[1.0, 0.0, 0.0]] * 3), "field 'intrinsics' has shape"),
    (lambda raw: with_meta(raw, cam2world=[[[10**400] * 4] * 4] * 4), "field 'cam2world' is not numeric"),
    (lambda raw: with_meta(raw, elevations={"0": 0.1}), "field 'elevations' is not numeric"),
    (lambda raw: with_meta(raw, azimuths=[0.0, "half", 1.0, 2.0]), "field 'azimuths' is not numeric"),
])
def test_mistyped_metadata_is_a_sample_error_naming_the_field(sample_factory, change, message):
    # training skips SampleErrors only: a TypeError or AttributeError here stopped it despite on_error "skip"
    raw = {**encode_sample(sample_factory("typo", n_views=4)), "__url__": "/data/shard-000003.tar"}
    decode_sample(raw)
    with pytest.raises(SampleError, match=r"sample 'typo' in /data/shard-000003\.tar: .*" + message):
        decode_sample(change(raw))


def test_bad_cameras_give_view_numbers_in_the_sample_not_in_the_drawn_views(sample_factory):
    raw = encode_sample(sample_factory("cams", n_views=8))
    meta = json.loads(raw["json"])
    meta["cam2world"][5][0][3] = float("nan")
    broken = {**raw, "json": json.dumps(meta).encode()}
    with pytest.raises(SampleError, match=r"cam2world holds NaN or inf \(views \[5\]\)"):
        decode_sample(broken, select=lambda n: [3, 5])  # was "views [1]", the position among the drawn
    with pytest.raises(SampleError, match=r"cam2world holds NaN or inf \(views \[5\]\)"):
        decode_sample(broken, select=lambda n: [0, 1])  # a sample is broken or not, whichever views are drawn
    meta = json.loads(raw["json"])
    meta["intrinsics"][6][1][1] = -1.0
    with pytest.raises(SampleError, match=r"intrinsics need positive focal lengths \(views \[6\]\)"):
        decode_sample({**raw, "json": json.dumps(meta).encode()}, select=lambda n: [6, 2])


def test_a_shard_cut_at_a_member_header_is_named_not_read_as_a_shorter_one(tmp_path, sample_factory):
    from vfusion3d_lightning.data.schema import ShardError, keys_in_shards, read_raw_samples

    with ShardWriter(tmp_path, maxcount=4) as writer:
        for i in range(3):
            writer.write_sample(sample_factory(f"obj{i}", n_views=2, size=8))
    shard = tmp_path / "shard-000000.tar"
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:  # cut 100 bytes into the header of the last sample's first member
        last = [m for m in tar.getmembers() if m.name.startswith("obj2")][0]
    shard.write_bytes(whole[: last.offset + 100])
    with tarfile.open(shard) as tar:  # tarfile alone reads it as a whole archive of two samples
        assert {m.name.split(".")[0] for m in tar} == {"obj0", "obj1"}
    with pytest.raises(ShardError, match="shard-000000.tar cannot be read .*the file was cut"):
        keys_in_shards([shard])
    with pytest.raises(ShardError, match="the file was cut"):
        list(read_raw_samples(shard))
