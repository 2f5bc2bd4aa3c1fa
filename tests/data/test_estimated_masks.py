"""Estimated masks (labelled generated videos) feed the opacity loss only; exact alpha (3D renders) composites."""

import numpy as np
import pytest
import torch

from vfusion3d_lightning.data.curate_shards import Labellers, label_shards
from vfusion3d_lightning.data.datamodules import LRMViews, MultiViewDataModule, OrbitClip, rgba_to_tensors
from vfusion3d_lightning.data.schema import ShardWriter, complete_shards, has_estimated_masks, read_samples

SIZE = 24
OBJECT_PIXEL, BACKGROUND_PIXEL = (12, 12), (0, 0)  # inside the disk of make_sample; a corner


def generated_sample(make_sample, key: str, mask_method: str | None = "rembg"):
    """A generated video on white (the disk's colour, white outside) whose estimated mask misses one object pixel
    and takes one background pixel for object."""
    sample = make_sample(key, n_views=8, size=SIZE)
    sample.source = "synthetic"
    disk = sample.images[..., 3:] > 0
    sample.images[..., :3] = np.where(disk, sample.images[..., :3], 255)
    sample.images[(slice(None), *OBJECT_PIXEL, 3)] = 0
    sample.images[(slice(None), *BACKGROUND_PIXEL, 3)] = 255
    sample.extra = {"mask_method": mask_method} if mask_method else {}
    return sample


def lrm_item(sample, size: int = SIZE, **kwargs) -> dict:
    views = LRMViews(num_supervision_views=3, include_input_view=True, input_size=size, supervision_size=size,
                     **kwargs)
    return views(sample, np.random.default_rng(0))


def pixel(images: torch.Tensor, where: tuple[int, int]) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3) at one pixel."""
    return images[..., where[0], where[1]]


def test_an_estimated_mask_leaves_the_generated_colours_and_goes_to_the_masks(sample_factory):
    sample = generated_sample(sample_factory, "gen")
    item = lrm_item(sample)
    colour = torch.tensor([0, 100, 200]) / 255  # view 0's colour; the targets are views 0..2
    stored = torch.from_numpy(sample.images[:3, OBJECT_PIXEL[0], OBJECT_PIXEL[1], :3]).float() / 255
    # the object pixel the mask misses keeps its generated colour in the input image and the targets
    torch.testing.assert_close(pixel(item["input_image"], OBJECT_PIXEL), colour)
    torch.testing.assert_close(pixel(item["target_images"], OBJECT_PIXEL), stored)
    assert pixel(item["target_images"], OBJECT_PIXEL)[:, 1].max() < 0.5  # not whitened
    # the background pixel the mask takes for object stays white, as generated
    torch.testing.assert_close(pixel(item["target_images"], BACKGROUND_PIXEL), torch.ones(3, 3))
    # the whole RGB is the frames as stored
    expected = torch.from_numpy(sample.images[:3, ..., :3]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(item["target_images"], expected)
    # the mask, errors and all, is what the opacity loss gets
    masks = item["target_masks"][:, 0]
    assert masks[:, OBJECT_PIXEL[0], OBJECT_PIXEL[1]].eq(0).all()
    assert masks[:, BACKGROUND_PIXEL[0], BACKGROUND_PIXEL[1]].eq(1).all()
    torch.testing.assert_close(masks, torch.from_numpy(sample.images[:3, ..., 3]).float() / 255)


def test_the_switch_composites_through_the_estimate_as_before(sample_factory):
    item = lrm_item(generated_sample(sample_factory, "gen"), composite_estimated_masks=True)
    torch.testing.assert_close(pixel(item["input_image"], OBJECT_PIXEL), torch.ones(3))  # whitened by the mask
    torch.testing.assert_close(pixel(item["target_images"], OBJECT_PIXEL), torch.ones(3, 3))
    assert item["target_masks"][:, 0, OBJECT_PIXEL[0], OBJECT_PIXEL[1]].eq(0).all()


@pytest.mark.parametrize("switch", [False, True])
def test_renders_with_exact_alpha_are_composited_on_white(switch, sample_factory):
    sample = sample_factory("render", n_views=8, size=SIZE)  # source "3d": coloured everywhere, alpha a disk
    sample.images[(slice(None), *OBJECT_PIXEL, 3)] = 0  # a transparent pixel inside (a hole in the object)
    assert not has_estimated_masks(sample)
    item = lrm_item(sample, composite_estimated_masks=switch)
    torch.testing.assert_close(pixel(item["target_images"], OBJECT_PIXEL), torch.ones(3, 3))
    torch.testing.assert_close(pixel(item["target_images"], BACKGROUND_PIXEL), torch.ones(3, 3))
    torch.testing.assert_close(pixel(item["input_image"], (12, 6)), torch.tensor([0, 100, 200]) / 255)
    for view, (rgb, alpha) in enumerate(zip(item["target_images"], item["target_masks"])):
        expected_rgb, expected_alpha = rgba_to_tensors(sample.images[view], SIZE)
        torch.testing.assert_close(rgb, expected_rgb)
        torch.testing.assert_close(alpha, expected_alpha)


def test_resizing_keeps_the_colour_where_an_estimated_mask_is_zero():
    # an RGBA resize premultiplies by alpha: a mask that misses the whole object would blacken it
    view = np.zeros((SIZE, SIZE, 4), np.uint8)
    view[..., :3] = (30, 140, 220)
    rgb, alpha = rgba_to_tensors(view, SIZE // 2, composite=False)
    assert rgb.shape == (3, SIZE // 2, SIZE // 2) and alpha.shape == (1, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(rgb, (torch.tensor([30, 140, 220]) / 255)[:, None, None].expand_as(rgb))
    assert alpha.eq(0).all()
    composited, _ = rgba_to_tensors(view, SIZE // 2)
    torch.testing.assert_close(composited, torch.ones_like(composited))


def test_which_masks_count_as_estimated(sample_factory):
    assert has_estimated_masks(generated_sample(sample_factory, "labelled"))
    # synthetic shards from before the marker
    assert has_estimated_masks(generated_sample(sample_factory, "older", mask_method=None))
    relabelled_render = sample_factory("render")
    relabelled_render.extra["mask_method"] = "threshold"  # `label` run on renders estimates their alpha anew
    assert has_estimated_masks(relabelled_render)
    assert not has_estimated_masks(sample_factory("render"))


def test_video_clips_of_generated_videos_keep_their_frames(sample_factory):
    sample = generated_sample(sample_factory, "gen")
    clip = OrbitClip(num_frames=8, frame_size=SIZE)(sample, np.random.default_rng(0))
    expected = torch.from_numpy(sample.images[..., :3]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(clip["frames"], expected)


def test_label_marks_its_masks_and_the_lrm_keeps_the_colours_they_miss(tmp_path, sample_factory):
    """End to end: a generated video with a near-white object pixel on the object's edge, which the threshold mask
    takes for background; `label` keeps the frames and marks the mask, and the LRM batches keep that pixel."""
    sample = generated_sample(sample_factory, "gen", mask_method=None)
    sample.images[..., 3] = 255  # as generated: all opaque
    row, col = 12, 12 + round(SIZE / 3) - 1  # the disk's rightmost pixel on the middle row, next to white
    assert sample.images[0, row, col + 1, :3].tolist() == [255, 255, 255]
    sample.images[:, row, col, :3] = 250  # light grey: within the threshold's tolerance of white
    with ShardWriter(tmp_path / "videos") as writer:
        writer.write_sample(sample)
    label_shards(tmp_path / "videos", tmp_path / "labelled", Labellers(masks="threshold"), progress=False)
    (labelled,) = read_samples(complete_shards(tmp_path / "labelled"))
    assert labelled.extra["mask_method"] == "threshold"
    np.testing.assert_array_equal(labelled.images[..., :3], sample.images[..., :3])  # RGB as generated
    assert (labelled.images[:, row, col, 3] == 0).all()  # the estimate misses the grey object pixel

    def batch(**switch):
        data = MultiViewDataModule(str(tmp_path / "labelled"), batch_size=1, num_workers=0, num_supervision_views=8,
                                   input_size=SIZE, supervision_size=SIZE, on_error="raise", **switch)
        return next(iter(data.train_dataloader()))

    grey = torch.full((1, 8, 3), 250 / 255)
    item = batch()
    torch.testing.assert_close(item["target_images"][..., row, col], grey)
    assert item["target_masks"][..., 0, row, col].eq(0).all()
    torch.testing.assert_close(batch(composite_estimated_masks=True)["target_images"][..., row, col],
                               torch.ones(1, 8, 3))
