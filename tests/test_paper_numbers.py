"""Every number of the paper that a shipped config encodes (vfusion3d_lightning.paper.PAPER_NUMBERS) is the
paper's: one test per record, so a drift names the number, the file and the key."""

import math

import pytest

from vfusion3d_lightning.paper import PAPER_NUMBERS, PaperNumber, lookup


def _same(found, expected) -> bool:
    if isinstance(expected, tuple):
        return isinstance(found, tuple) and len(found) == len(expected) and all(map(_same, found, expected))
    if isinstance(expected, float):
        return isinstance(found, (int, float)) and not isinstance(found, bool) and math.isclose(found, expected)
    return type(found) is type(expected) and found == expected


@pytest.mark.parametrize("record", PAPER_NUMBERS, ids=lambda r: f"{r.name} ({r.config_file}: {r.config_key})")
def test_shipped_config_holds_the_papers_number(record: PaperNumber):
    # lookup raises KeyError naming the file and key when a record's key no longer exists
    found = lookup(record.config_file, record.config_key)
    assert _same(found, record.value), (
        f"{record.config_file}: {record.config_key} is {found!r}, the paper's {record.name} is {record.value!r} "
        f"({record.where_in_paper}){'; ' + record.note if record.note else ''}")


def test_records_are_unique_and_say_where_in_the_paper():
    keys = [(r.config_file, r.config_key) for r in PAPER_NUMBERS]
    assert len(keys) == len(set(keys))
    assert all(r.where_in_paper and r.name for r in PAPER_NUMBERS)


def test_lookup_follows_references_and_names_a_missing_key():
    # the pre-training config's callbacks and network are references to other files, read relative to it
    stages = lookup("configs/lrm/vfusion3d_pretrain.yaml", "trainer.callbacks.ResolutionStages.init_args.epochs")
    assert stages == (5, 5, 5, 5, 10)
    assert lookup("configs/lrm/vfusion3d_pretrain.yaml", "model.init_args.network.transformer_layers") == 16
    with pytest.raises(KeyError, match=r"vfusion3d_pretrain.yaml: model.init_args .*has no 'lrr'"):
        lookup("configs/lrm/vfusion3d_pretrain.yaml", "model.init_args.lrr")
    with pytest.raises(KeyError, match="has no 'Missing'"):
        lookup("configs/lrm/vfusion3d_pretrain.yaml", "trainer.callbacks.Missing.init_args")
    with pytest.raises(KeyError, match="no argument 'views'"):
        lookup("vfusion3d_lightning/data/render.py", "orbit_cameras.views")
    with pytest.raises(FileNotFoundError, match="no shipped config"):
        lookup("configs/lrm/gone.yaml", "trainer.max_epochs")


def test_a_drifted_value_fails_the_comparison():
    assert not _same((128, 192, 256, 320, 512), (128, 192, 256, 320, 384))
    assert not _same(1e-4, 4e-4) and not _same(True, 1.0) and not _same([0.9, 0.95], (0.9, 0.95))
    assert _same(4e-4, 4.0e-4) and _same(0.02, 0.02) and _same((0.0, math.pi / 4), (0.0, 0.7853981633974483))


def test_paper_pipeline_renders_generates_and_trains_video_at_one_size():
    # the orbit renders the video model trains on, its frames and the generated videos share one resolution
    pipeline = "configs/pipeline/paper.yaml"
    frame_size = lookup(pipeline, "video.config.data.init_args.frame_size")
    assert lookup(pipeline, "render.resolution") == frame_size == lookup(pipeline, "generate.size") == 512
    assert lookup(pipeline, "video.config.model.init_args.model") == "i2vgen-xl-pretrained"  # image + prompt
