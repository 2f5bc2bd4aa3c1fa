import lightning as L
import pytest
import torch

from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.training.callbacks import CameraNoise, LRRestartAtStage, RandomResolution, ResolutionStages


def test_resolution_stages_follow_the_paper_schedule():
    stages = ResolutionStages()
    assert [stages.resolution_at(e) for e in range(32)] == [128] * 5 + [192] * 5 + [256] * 5 + [320] * 5 + [384] * 12
    assert stages.end_epoch_of(192) == 10  # where the paper restarts the LR
    with pytest.raises(ValueError, match="no stage renders at 200"):
        stages.end_epoch_of(200)
    with pytest.raises(ValueError, match="one epoch count per resolution"):
        ResolutionStages([128, 256], [5])


def test_lr_restart_needs_resolution_stages():
    module = L.LightningModule()
    module.restart_epochs = []
    trainer = L.Trainer(callbacks=[LRRestartAtStage(192)], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="exactly one ResolutionStages"):
        LRRestartAtStage(192).setup(trainer, module, "fit")
    trainer = L.Trainer(callbacks=[ResolutionStages(), LRRestartAtStage(192)], logger=False,
                        enable_checkpointing=False)
    trainer.callbacks[1].setup(trainer, module, "fit")
    assert module.restart_epochs == [10]


class _Trainer:
    global_step, global_rank = 7, 0


class _Module:
    render_size = 0

    def log(self, *args, **kwargs):
        pass


def _drawn_sizes(callback, steps, accumulate=1):
    module, sizes = _Module(), []
    for step in steps:
        for batch_idx in range(accumulate):
            trainer = _StepTrainer(0, step, accumulate)
            callback.on_train_batch_start(trainer, module, None, step * accumulate + batch_idx)
            sizes.append(module.render_size)
    return sizes


def test_random_resolution_covers_the_list_and_draws_the_same_sizes_after_a_resume():
    sizes = [24, 32, 48]
    drawn = _drawn_sizes(RandomResolution(sizes, seed=3), range(300))
    counts = {size: drawn.count(size) for size in sizes}
    assert set(drawn) == set(sizes) and min(counts.values()) > 60, counts  # ~100 each: uniform over the list
    assert drawn != sorted(drawn) and len(set(drawn[:10])) > 1  # drawn per step, not one stage after another
    # a resumed run: a fresh callback, another global RNG state, starting at step 150
    torch.manual_seed(1234)
    assert _drawn_sizes(RandomResolution(sizes, seed=3), range(150, 300)) == drawn[150:]
    assert _drawn_sizes(RandomResolution(sizes, seed=4), range(300)) != drawn  # the seed matters
    # every rank draws the same size (the key has no rank); micro-batches of one step draw their own
    module = _Module()
    RandomResolution(sizes, seed=3).on_train_batch_start(_StepTrainer(5, 7, 1), module, None, 7)
    assert module.render_size == drawn[7]
    accumulated = _drawn_sizes(RandomResolution(sizes, seed=3), range(100), accumulate=2)
    assert accumulated[0::2] == drawn[:100] and accumulated[1::2] != accumulated[0::2]


def test_random_resolution_refuses_a_second_schedule():
    module = L.LightningModule()
    with pytest.raises(ValueError, match="non-empty list of positive sizes"):
        RandomResolution([])
    for other in (ResolutionStages(), LRRestartAtStage(192)):
        trainer = L.Trainer(callbacks=[RandomResolution(), other], logger=False, enable_checkpointing=False)
        with pytest.raises(ValueError, match=f"{type(other).__name__} in the same trainer"):
            trainer.callbacks[0].setup(trainer, module, "fit")


def test_camera_noise_is_seeded_and_bounded():
    batch = {"source_camera": canonical_source_camera(3), "render_cameras": turntable_cameras(4)[None].repeat(3, 1, 1)}
    first = {k: v.clone() for k, v in batch.items()}
    CameraNoise(0.02, seed=1).on_train_batch_start(_Trainer(), None, first, 0)
    second = {k: v.clone() for k, v in batch.items()}
    CameraNoise(0.02, seed=1).on_train_batch_start(_Trainer(), None, second, 0)
    for key in batch:
        assert torch.equal(first[key], second[key])
        delta = first[key] - batch[key]
        assert 0 < delta.abs().max() <= 0.02
    only_source = {k: v.clone() for k, v in batch.items()}
    CameraNoise(0.02, render=False).on_train_batch_start(_Trainer(), None, only_source, 0)
    assert torch.equal(only_source["render_cameras"], batch["render_cameras"])


class _StepTrainer:
    def __init__(self, rank, step, accumulate=1):
        self.global_rank, self.global_step, self.accumulate_grad_batches = rank, step, accumulate


def test_camera_noise_differs_by_rank_and_micro_batch_and_repeats_on_resume():
    batch = {"source_camera": canonical_source_camera(2), "render_cameras": turntable_cameras(4)[None].repeat(2, 1, 1)}

    def noise(rank, step, batch_idx, accumulate=2, **kwargs):
        noisy = {k: v.clone() for k, v in batch.items()}
        CameraNoise(0.02, seed=1, **kwargs).on_train_batch_start(_StepTrainer(rank, step, accumulate), None, noisy,
                                                                 batch_idx)
        return {k: noisy[k] - batch[k] for k in batch}

    first = noise(0, 5, 10)
    torch.manual_seed(123)  # a resumed run: another global RNG state, the same (rank, step, micro-batch)
    again = noise(0, 5, 10)
    assert all(torch.equal(first[k], again[k]) for k in batch)
    assert all(torch.equal(first[k], noise(0, 5, 12)[k]) for k in batch)  # batch 12: micro-batch 0 of step 5 too
    for other in (noise(1, 5, 10), noise(0, 5, 11), noise(0, 6, 10)):  # another rank, micro-batch, step
        assert not any(torch.allclose(first[k], other[k]) for k in batch)
    # source and render cameras draw apart, whichever of them is on
    only_render = noise(0, 5, 10, source=False)
    assert torch.equal(only_render["render_cameras"], first["render_cameras"])
    assert not torch.allclose(first["source_camera"][0, :12], first["render_cameras"][0, 0, :12])  # the 3x4 poses
