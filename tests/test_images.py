"""Image reading in both readers, the shard view decoder (schema.decode_sample) and the input loader
(preprocess.load_image): every PIL mode at its range, sizes checked before decoding, tiny inputs refused."""

import io
import json
import re
import resource
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from vfusion3d_lightning.data.preprocess import MAX_INPUT_PIXELS, load_image, preprocess
from vfusion3d_lightning.data.schema import MAX_VIEW_PIXELS, SCHEMA_VERSION, SampleError, decode_sample

MB = 2**20


def grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A black 8-bit grey PNG of any size, made without holding its pixels: 8000x8000 is ~80 kB. With `rows`,
    only that many rows of pixel data follow the header (a file cut short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, block = zlib.compressobj(9), bytes(width + 1) * 256  # a filter byte and the row's pixels, 256 rows
    stored = height if rows is None else rows
    idat = b"".join(packer.compress(block[: (width + 1) * min(256, stored - start)])
                    for start in range(0, stored, 256)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Memory:
    """Peak Python allocations (tracemalloc: numpy arrays, bytes) and growth of the process's peak RSS."""

    def __enter__(self):
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.python = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def shard_sample(views: list[bytes], width: int, height: int, key: str = "odd") -> dict:
    meta = {"schema": SCHEMA_VERSION, "object_id": key, "source": "3d", "num_views": len(views), "width": width,
            "height": height, "image_format": "png", "cam2world": None, "intrinsics": None}
    return {"__key__": key, "__url__": "/data/shard-000007.tar", "json": json.dumps(meta).encode(),
            **{f"{i:03d}.png": view for i, view in enumerate(views)}}


GRADIENT16 = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
GREY8 = np.round(GRADIENT16 / 257).astype(np.uint8)


def rgba(grey, alpha=None):
    return np.dstack([grey, grey, grey, np.full(grey.shape, 255, np.uint8) if alpha is None else alpha])


def test_shard_views_of_every_png_mode_decode_at_their_range():
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    palette = Image.fromarray((grey // 128).astype(np.uint8), "P")
    palette.putpalette([200, 30, 30, 0, 0, 255])
    cases = [  # (view file, the RGBA expected)
        (encoded(Image.fromarray(GRADIENT16)), rgba(GREY8)),  # 16-bit grey: was clipped to white
        (encoded(Image.fromarray(GRADIENT16), transparency=64), rgba(GREY8, np.where(GRADIENT16 == 64, 0, 255))),
        (encoded(Image.fromarray(grey, "L"), transparency=8), rgba(grey, np.where(grey == 8, 0, 255))),
        (encoded(Image.fromarray(np.dstack([grey, 255 - grey]), "LA")), rgba(grey, 255 - grey)),
        (encoded(palette, transparency=1), np.where((grey < 128)[..., None], [200, 30, 30, 255], [0, 0, 255, 0])),
    ]
    sample = decode_sample(shard_sample([view for view, _ in cases], 32, 32))
    for i, (_, expected) in enumerate(cases):
        np.testing.assert_array_equal(sample.images[i], expected, err_msg=f"view {i}")


def test_jpeg_views_take_16_bit_masks_and_cmyk():
    mask16 = GRADIENT16  # soft edges: 16-bit values between 0 and 65535
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    meta = {"schema": SCHEMA_VERSION, "object_id": "j", "source": "3d", "num_views": 1, "width": 32, "height": 32,
            "image_format": "jpg"}
    raw = {"__key__": "j", "json": json.dumps(meta), "000.jpg": encoded(cmyk, "JPEG", quality=95),
           "000.mask.png": encoded(Image.fromarray(mask16))}
    view = decode_sample(raw).images[0]
    np.testing.assert_array_equal(view[..., 3], GREY8)  # was clipped to 255
    assert np.abs(view[..., :3].astype(int) - [255, 0, 0]).max() <= 8


def test_shard_decode_errors_name_the_shard_and_the_view():
    good = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 4), np.uint8)))
    raw = shard_sample([good, good, good[: len(good) // 2]], 24, 24)
    with pytest.raises(SampleError, match=r"sample 'odd' in /data/shard-000007\.tar: view 2 file 002\.png cannot be "
                                          r"decoded .*write the sample again"):
        decode_sample(raw)


def test_a_small_view_declaring_a_huge_image_is_refused_before_decoding():
    bomb = grey_png(8000, 8000)  # decodes to 64 MB grey, 256 MB RGBA
    assert len(bomb) < 200_000
    small = encoded(Image.fromarray(np.zeros((24, 24, 4), np.uint8)))
    with Memory() as memory:
        with pytest.raises(SampleError) as error:
            decode_sample(shard_sample([small, bomb], 24, 24))
    assert memory.python < 100 * MB and memory.rss_growth < 100 * MB  # it was decoded (256 MB), then compared
    assert re.search(r"'odd' in .*shard-000007\.tar: view 1 \(001\.png\) is 8000x8000 pixels, metadata says 24x24",
                     str(error.value))
    with Memory() as memory:
        with pytest.raises(SampleError, match=rf"views of 8000x8000 pixels exceed the cap of {MAX_VIEW_PIXELS} "
                                              r"pixels \(schema\.MAX_VIEW_PIXELS"):
            decode_sample(shard_sample([bomb], 8000, 8000))  # metadata that agrees with the bomb
    assert memory.python < 100 * MB and memory.rss_growth < 100 * MB


def test_load_image_refuses_huge_images_before_decoding_naming_the_file(tmp_path):
    large, huge = tmp_path / "large.png", tmp_path / "huge.png"
    large.write_bytes(grey_png(9000, 9000))  # 81 Mpx: under PIL's own warning, over MAX_INPUT_PIXELS
    with Memory() as memory:
        with pytest.raises(ValueError, match=rf"input image {large} is 9000x9000 pixels, over the limit of "
                                             rf"{MAX_INPUT_PIXELS} pixels \(preprocess\.MAX_INPUT_PIXELS.*downscale"):
            load_image(large)
    assert memory.python < 100 * MB and memory.rss_growth < 100 * MB
    huge.write_bytes(grey_png(20000, 20000, rows=1))  # 400 Mpx: PIL raises DecompressionBombError, no ValueError
    with pytest.raises(ValueError, match=rf"input image {huge} is more than .* pixels, over the limit"):
        load_image(huge)


def test_load_image_reads_every_mode_at_its_range(tmp_path):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    palette = Image.fromarray((grey // 128).astype(np.uint8), "P")
    palette.putpalette([200, 30, 30, 0, 0, 255])
    cases = {  # file -> (image, save options, the array expected)
        "grey16.png": (Image.fromarray(GRADIENT16), {}, np.dstack([GREY8] * 3)),  # was clipped to white
        "float.tif": (Image.fromarray(GRADIENT16.astype(np.float32) / 65535), {}, np.dstack([GREY8] * 3)),
        "int32.tif": (Image.fromarray(GRADIENT16.astype(np.int32)), {}, np.dstack([GREY8] * 3)),
        "grey-trns.png": (Image.fromarray(grey, "L"), {"transparency": 8}, rgba(grey, np.where(grey == 8, 0, 255))),
        "rgb-trns.png": (Image.fromarray(np.dstack([grey] * 3)), {"transparency": (8, 8, 8)},
                         rgba(grey, np.where(grey == 8, 0, 255))),
        "la.png": (Image.fromarray(np.dstack([grey, 255 - grey]), "LA"), {}, rgba(grey, 255 - grey)),
        "palette.png": (palette, {"transparency": 1},
                        np.where((grey < 128)[..., None], [200, 30, 30, 255], [0, 0, 255, 0])),
    }
    for name, (image, options, expected) in cases.items():
        image.save(tmp_path / name, **options)
        np.testing.assert_array_equal(load_image(tmp_path / name), expected, err_msg=name)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "cmyk.jpg").astype(int) - [255, 0, 0]).max() <= 8
    Image.fromarray(np.full((32, 32), -5.0, np.float32)).save(tmp_path / "negative.tif")
    with pytest.raises(ValueError, match=r"cannot read .*negative\.tif .*outside 0\.\.1 and 0\.\.255"):
        load_image(tmp_path / "negative.tif")


def test_a_16_bit_grey_photo_on_white_finds_its_object(tmp_path):
    photo = np.full((64, 64), 65535, np.uint16)
    photo[16:48, 20:44] = 12000  # a dark object on white
    Image.fromarray(photo).save(tmp_path / "scan.png")
    image = preprocess(tmp_path / "scan.png", size=32, background="white")  # was "no object found"
    assert image.min() < 0.3 and image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_inputs_too_small_to_show_an_object_are_refused(tmp_path):
    Image.new("RGBA", (1, 1), (200, 30, 30, 255)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=rf"input image {tmp_path / 'dot.png'} is 1x1 pixels, too small .*at least "
                                         r"16x16, preprocess\.MIN_INPUT_SIDE"):
        preprocess(tmp_path / "dot.png", size=32)
    with pytest.raises(ValueError, match="the input image is 12x40 pixels, too small"):
        preprocess(np.full((40, 12, 3), 100, np.uint8), size=32, background="white")
    line = np.zeros((64, 64, 4), np.uint8)
    line[10, 5:50] = 255  # a one-pixel line: the crop would be empty and the input blank
    with pytest.raises(ValueError, match=r"the object found is a line of pixels \(rows 10-10"):
        preprocess(line, size=32)
