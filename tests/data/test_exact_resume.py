"""A fit killed mid-epoch and resumed from its last checkpoint trains on exactly the batches, in the same order, of
an uninterrupted fit, and ends with the same weights: for shard streams (LRM, video) and for cached feature tables
(elevation MLP)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from vfusion3d_lightning.data.datamodules import (
    EpochDataLoader,
    EpochShuffle,
    VideoDataModule,
    restore_loader_states,
    trainer_progress,
)


class Recorder(L.LightningModule):
    """Learns a scalar from each batch, so the weights depend on the order of the batches; logs what it saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            ids, signal = batch["object_id"], batch["frames"].mean(dim=(1, 2, 3, 4))
        else:
            ids, signal = [str(int(i)) for i in batch[1]], batch[0][:, 0]
        self.seen += [(self.global_step, i) for i in ids]
        return ((self.weight - signal) ** 2 * (1 + torch.arange(len(signal)))).mean()

    def on_train_start(self):
        restore_loader_states(self.trainer)

    def configure_optimizers(self):
        # as the LRM and video modules do: this makes Lightning start the loader before it restores the checkpoint
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Tensors(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.data = TensorDataset(torch.rand(24, 1, generator=torch.Generator().manual_seed(0)), torch.arange(24))

    def train_dataloader(self):
        return EpochDataLoader(self.data, trainer_progress(self), batch_size=4, sampler=EpochShuffle(24, seed=3))


def shards(folder, workers: int) -> L.LightningDataModule:
    return VideoDataModule(str(folder), batch_size=2, num_workers=workers, num_frames=4, frame_size=16,
                           shuffle_buffer=5)


def fit(root, data, max_epochs: int, ckpt_path=None) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=1,
                                                   filename="{step}")])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("source", "stop"), [("tensors", "mid-second-epoch"), ("tensors", "end-of-first-epoch"),
                                              ("tensors", "mid-first-epoch"), ("shards-0-workers", "mid-second-epoch"),
                                              ("shards-2-workers", "mid-second-epoch"),
                                              ("shards-2-workers", "end-of-first-epoch")])
def test_a_fit_resumed_mid_epoch_sees_the_batches_of_an_uninterrupted_one(tmp_path, source, stop, shard_factory):
    if source != "tensors":
        shard_factory(tmp_path / "shards", n_shards=4, per_shard=6, n_views=4, size=16)

    def data():
        if source == "tensors":
            return Tensors()
        return shards(tmp_path / "shards", int(source.split("-")[1]))

    whole = fit(tmp_path / "whole", data(), max_epochs=2)
    steps_per_epoch = max(step for step, _ in whole.seen) // 2 + 1
    assert steps_per_epoch >= 4
    stop_at = {"mid-first-epoch": 3, "end-of-first-epoch": steps_per_epoch,
               "mid-second-epoch": steps_per_epoch + 2}[stop]
    resumed = fit(tmp_path / "resumed", data(), max_epochs=2,
                  ckpt_path=tmp_path / "whole" / "ckpt" / f"step={stop_at}.ckpt")

    assert resumed.seen == [(step, key) for step, key in whole.seen if step >= stop_at]
    torch.testing.assert_close(resumed.weight, whole.weight, rtol=0, atol=0)


def test_epoch_shuffle_depends_on_the_epoch_only():
    first, again = EpochShuffle(10, seed=1), EpochShuffle(10, seed=1)
    first.set_epoch(0)
    order0 = list(first)
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again) != order0
    assert sorted(order0) == list(range(10))
