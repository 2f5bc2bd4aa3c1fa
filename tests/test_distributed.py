"""Multi-process training through Lightning's strategies: DDP with 2 CPU processes (gloo), the FSDP config."""

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder
from vfusion3d_lightning.training.lightning_cli import lightning_cli

ROOT = Path(__file__).resolve().parents[1]


class RankRecord(L.Callback):
    """Writes what each rank saw: the object ids of its batches per epoch, the patches its training steps
    supervised, its validation metrics, and a digest of its parameters at the end (spawned processes cannot hand
    objects back)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.record = {"batches": {}, "patches": [], "val": {}}

    def on_train_start(self, trainer, pl_module):  # in the spawned process: the module's patch draws, as drawn
        draw = pl_module._patch

        def recorded(*args, **kwargs):
            patch = draw(*args, **kwargs)
            self.record["patches"].append([trainer.global_step, *patch])
            return patch

        pl_module._patch = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["batches"].setdefault(str(trainer.current_epoch), []).append(list(batch["object_id"]))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record["val"][str(trainer.current_epoch)] = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        self.record["parameters"] = digest.hexdigest()
        self.record["world_size"] = trainer.world_size
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


@pytest.mark.slow
@pytest.mark.parametrize("tuning", [[], ["--model.init_args.lora.rank", "4"]], ids=["full", "lora"])
def test_ddp_on_two_processes_splits_the_data_and_keeps_the_ranks_in_step(tmp_path, tuning):
    write_assets(tmp_path / "assets", 8, seed=2, progress=False)
    render_folder(tmp_path / "assets", tmp_path / "set32", RenderSettings(views="random32", resolution=48),
                  workers=1, shard_size=1, progress=False)
    shards = str(tmp_path / "set32" / "shard-*.tar")
    cli = lightning_cli(["--config", str(ROOT / "configs/lrm/tiny.yaml"), "--config",
                         str(ROOT / "configs/trainer/ddp.yaml"), "--trainer.accelerator", "cpu",
                         "--trainer.devices", "2", "--trainer.strategy.init_args.start_method", "spawn",
                         "--trainer.strategy.init_args.process_group_backend", "gloo",
                         # a collective that one rank never joins fails after this instead of hanging CI
                         "--trainer.strategy.init_args.timeout", "0:02:00",
                         "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
                         "--data.init_args.train_shards", shards, "--data.init_args.val_shards", shards,
                         "--data.init_args.num_workers", "0", *tuning], run=False)
    cli.trainer.callbacks.append(RankRecord(str(tmp_path)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for epoch in ("0", "1"):
        seen = [[obj for batch in r["batches"][epoch] for obj in batch] for r in ranks]
        # 8 samples an epoch over 2 ranks, batches of 2: each rank 2 batches of its own objects
        assert [len(r["batches"][epoch]) for r in ranks] == [2, 2]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 8
    # gradients are averaged over ranks, so both end with the same weights; metrics are reduced over ranks
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert ranks[0]["val"] == ranks[1]["val"] and "val/psnr" in ranks[0]["val"]["1"]
    # each rank supervises its own patches: a patch of 16 at 24 px has 81 places, drawn per rank and step
    patches = [r["patches"] for r in ranks]
    assert [[p[0] for p in r] for r in patches] == [list(range(4))] * 2
    assert sum(a != b for a, b in zip(*patches)) >= 3, patches


def test_fsdp_config_builds_the_sharded_strategy():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy

    from vfusion3d_lightning.models.lrm.transformer import ModulatedBlock

    trainer = yaml.safe_load((ROOT / "configs/trainer/fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "sharded"
    assert ModulatedBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert trainer["precision"] == "bf16-mixed" and torch.distributed.is_available()
