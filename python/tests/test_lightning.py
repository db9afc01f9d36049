"""The Lightning plugins in a real Trainer: ModelCheckpoint saves, ckpt_path resume,
save_top_k rotation, async snapshot isolation and background errors."""

from __future__ import annotations

import os

import pytest
import torch

lightning = pytest.importorskip("lightning")
import uring_ckpt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from uring_ckpt.lightning import AsyncUringCheckpointIO, UringCheckpointIO


class Tiny(LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = torch.nn.Linear(4, hidden)
        self.head = torch.nn.Linear(hidden, 1).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).to(torch.bfloat16)).float()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def trainer(tmp_path, plugin, max_steps, **ckpt_kwargs) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[plugin],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", **ckpt_kwargs)],
    )


@pytest.mark.parametrize("plugin_cls", [UringCheckpointIO, AsyncUringCheckpointIO])
def test_fit_save_and_resume(tmp_path, plugin_cls):
    torch.manual_seed(0)
    model = Tiny()
    t1 = trainer(tmp_path, plugin_cls(), max_steps=6, every_n_train_steps=3, save_top_k=-1)
    t1.fit(model, loader())
    ckpts = tmp_path / "ckpts"
    path = ckpts / "epoch=0-step=6.ckpt"
    assert path.is_dir() and (path / "manifest.json").is_file(), sorted(os.listdir(ckpts))
    uring_ckpt.verify(path)
    saved = uring_ckpt.load(path)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["hidden"] == 8
    for name, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert saved["state_dict"]["head.weight"].dtype == torch.bfloat16

    # A new Trainer resumes from it and goes on from step 6 with the same weights.
    torch.manual_seed(1)
    resumed = Tiny()
    seen = {}

    class Probe(lightning.pytorch.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.clone() for k, v in module.state_dict().items()}

    t2 = trainer(tmp_path / "second", plugin_cls(), max_steps=8, every_n_train_steps=100)
    t2.callbacks.append(Probe())
    t2.fit(resumed, loader(), ckpt_path=str(path))
    assert seen["step"] == 6
    for name, value in model.state_dict().items():
        assert torch.equal(seen["weights"][name], value), name
    assert t2.global_step == 8


def test_save_top_k_rotation_removes_old_checkpoints(tmp_path):
    model = Tiny()
    cb_kwargs = {
        "every_n_train_steps": 2,
        "save_top_k": 2,
        "monitor": "step",
        "mode": "max",
        "save_last": True,
    }
    t = trainer(tmp_path, AsyncUringCheckpointIO(), max_steps=8, **cb_kwargs)
    t.fit(model, loader())
    names = sorted(os.listdir(tmp_path / "ckpts"))
    assert names == ["epoch=0-step=6.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"], names
    for name in names:
        uring_ckpt.verify(tmp_path / "ckpts" / name)
    assert uring_ckpt.load(tmp_path / "ckpts" / "last.ckpt")["global_step"] == 8


def test_async_plugin_snapshot_isolation_and_errors(tmp_path):
    plugin = AsyncUringCheckpointIO()
    w = torch.zeros(1 << 18)
    plugin.save_checkpoint({"w": w, "global_step": 1}, tmp_path / "a.ckpt")
    w.fill_(3.0)  # right after save_checkpoint returns
    back = plugin.load_checkpoint(tmp_path / "a.ckpt")  # waits for the save in flight
    assert torch.count_nonzero(back["w"]) == 0

    # A background failure (the parent is a file) surfaces at the next call.
    (tmp_path / "file").write_bytes(b"")
    plugin.save_checkpoint({"w": w}, tmp_path / "file" / "b.ckpt")
    with pytest.raises(OSError):
        plugin.teardown()
    plugin.teardown()  # raised once

    with pytest.raises(TypeError):
        plugin.save_checkpoint({}, tmp_path / "c.ckpt", storage_options={"x": 1})
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # in the background
    plugin.teardown()  # waits for it
    assert not (tmp_path / "a.ckpt").exists()


class _Exec:
    """Pickles as exec(code): what a hostile checkpoint would carry."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_resume_refuses_a_hostile_sidecar_by_default(tmp_path):
    t1 = trainer(tmp_path, UringCheckpointIO(), max_steps=2, every_n_train_steps=2, save_top_k=-1)
    t1.fit(Tiny(), loader())
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    marker = tmp_path / "marker"
    state = uring_ckpt.load(path)
    state["payload"] = _Exec(f"open({str(marker)!r}, 'w').close()")
    uring_ckpt.save(state, path, replace=True)

    # Trainer.fit(ckpt_path=...) passes weights_only=None: the plugin reads it as safe.
    t2 = trainer(tmp_path / "second", UringCheckpointIO(), max_steps=3, every_n_train_steps=100)
    with pytest.raises(uring_ckpt.UnsafeCheckpointError, match="builtins.exec"):
        t2.fit(Tiny(), loader(), ckpt_path=str(path))
    assert not marker.exists()
    # Only an explicit weights_only=False unpickles everything (and so runs the payload).
    t3 = trainer(tmp_path / "third", UringCheckpointIO(), max_steps=3, every_n_train_steps=100)
    t3.fit(Tiny(), loader(), ckpt_path=str(path), weights_only=False)
    assert marker.exists() and t3.global_step == 3


def test_reserve_callback_faults_the_area_in_before_the_first_save(tmp_path):
    from uring_ckpt.lightning import ReserveSnapshot

    plugin = AsyncUringCheckpointIO()
    reserve = plugin.reserve_callback()
    assert isinstance(reserve, ReserveSnapshot)
    seen = {}

    class Probe(lightning.pytorch.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # after the first step, before the first save (step 3)
                plugin.saver().wait_reserved()
                seen["stats"] = plugin.saver().snapshot_stats()
                seen["estimate"] = ReserveSnapshot.estimate(trainer, module)

    model = Tiny()
    t = Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[plugin],
        callbacks=[
            reserve,
            Probe(),
            ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1),
        ],
    )
    t.fit(model, loader())
    stats = seen["stats"]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert seen["estimate"] > 2 * param_bytes, "the weights and Adam's moments"
    assert reserve.reserved >= seen["estimate"] + (1 << 20) and reserve.reserved % (2 << 20) == 0
    assert stats["areas"] == 1 and stats["reserved_bytes"] == reserve.reserved, stats
    assert stats["resident_bytes"] == stats["reserved_bytes"] and not stats["reserving"], stats
    for name in ("epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"):
        uring_ckpt.verify(tmp_path / "ckpts" / name)
    assert uring_ckpt.load(tmp_path / "ckpts" / "epoch=0-step=6.ckpt")["global_step"] == 6


def test_async_plugin_reserve_argument(tmp_path):
    plugin = AsyncUringCheckpointIO(reserve=3 << 20)
    stats = plugin.saver().snapshot_stats()
    assert stats["areas"] == 1 and stats["reserved_bytes"] == 3 << 20, stats
    plugin.save_checkpoint({"w": torch.ones(1 << 10), "global_step": 1}, tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # after that save, in the background
    plugin.teardown()
    assert not (tmp_path / "a.ckpt").exists()


def test_async_plugin_removes_in_the_background_in_order_with_saves(tmp_path):
    import threading

    plugin = AsyncUringCheckpointIO()
    w = torch.arange(1 << 16, dtype=torch.float32)
    # Save, remove, save again to the same path: the second save waits for the removal.
    plugin.save_checkpoint({"w": w, "n": 1}, tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    plugin.save_checkpoint({"w": w, "n": 2}, tmp_path / "a.ckpt")
    assert plugin.load_checkpoint(tmp_path / "a.ckpt")["n"] == 2  # waits for everything
    # The removal thread runs at background_nice.
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    niceness = plugin._remover.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert niceness.result() >= plugin.config.background_nice == 10
    plugin.teardown()
    assert not (tmp_path / "a.ckpt").exists()
    # A failed removal (not a checkpoint) surfaces at the next call.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file").write_bytes(b"x")
    plugin.remove_checkpoint(tmp_path / "plain")
    with pytest.raises(uring_ckpt.NotACheckpointError):
        plugin.teardown()
    plugin.teardown()  # raised once
    assert (tmp_path / "plain" / "file").exists()
