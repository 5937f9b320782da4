"""Lightning wrapper: overfitting a fixed batch, the latent cache, modes, atomic checkpoints."""
import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cldm.checkpoint import CheckpointError
from cldm.lightning import (AtomicCheckpointIO, ColorControlModule, find_resume_checkpoint,
                            is_complete_checkpoint, remove_partial_checkpoints)
from cldm.model import TINY_CONFIG, load_config
from cldm.trainable import export_keys
from tests.train_helpers import one_thread, tiny_batch, tiny_model  # noqa: F401 (autouse fixture)


def with_latents(module, batch):
    """Add what the latent cache stores (unscaled posterior mean/std) to a dataset batch."""
    vae = module.model.first_stage_model
    with torch.no_grad():
        jpg = vae.encode(batch["jpg"].permute(0, 3, 1, 2))
        ref = vae.encode(batch["hint"][..., :3].permute(0, 3, 1, 2) * 2 - 1)
    return {**batch, "jpg_latent_mean": jpg.mean, "jpg_latent_std": jpg.std,
            "ref_latent_mean": ref.mean, "ref_latent_std": ref.std}


def fixed_loss(module, batch):
    g = torch.Generator().manual_seed(123)
    t = torch.tensor([100, 700])
    noise = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return module.compute_loss(batch, noise=noise, t=t, generator=g).item()


def test_overfit_fixed_batch_moves_only_trainable_weights():
    """20 Lightning steps (random noise and timesteps, lr 1e-2) on one batch of 2.

    Threshold: the loss at fixed noise/timesteps falls by at least 20 % (measured 1.054 -> 0.76,
    -28 %, on the 2-core CPU); locked tensors stay bitwise equal, all trainable ones move.
    """
    torch.manual_seed(0)
    module = ColorControlModule(tiny_model("v2"), lr=1e-2)
    batch = with_latents(module, tiny_batch(2))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    loss0 = fixed_loss(module, batch)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch] * 20, batch_size=None))
    loss1 = fixed_loss(module, batch)
    assert loss1 < 0.8 * loss0, (loss0, loss1)

    after = module.model.state_dict()
    trainable = set(export_keys(module.model))
    locked = [k for k in after if k not in trainable]
    assert [k for k in locked if not torch.equal(after[k], before[k])] == []
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(after[w][:, :4], before[w][:, :4])
    moved = [k for k in trainable if not torch.equal(after[k], before[k])]
    assert len(moved) == len(trainable), sorted(trainable - set(moved))[:5]


def test_latent_cache_loss_equals_vae_loss():
    module = ColorControlModule(tiny_model("v2"))
    batch = tiny_batch(2, seed=5)
    cached = with_latents(module, batch)
    del cached["jpg"]  # the step must not need the image: no VAE encode
    calls = []
    module.model.first_stage_model.encoder.register_forward_hook(lambda *a: calls.append(1))
    module.train()
    noise, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    l_vae = module.compute_loss(batch, noise=noise, t=t, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 2  # target + reference
    l_cache = module.compute_loss(cached, noise=noise, t=t, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 2  # none more
    torch.testing.assert_close(l_cache, l_vae, rtol=1e-6, atol=0)
    assert abs(l_vae.item() - module.compute_loss(batch, noise=noise, t=t).item()) > 1e-6  # the draw matters


def test_frozen_encoders_stay_in_eval_when_lightning_calls_train():
    module = ColorControlModule(tiny_model("v2"))
    module.train()
    assert not module.model.first_stage_model.training and not module.model.cond_stage_model.training
    # the locked UNet stays in train mode: its flag turns gradient checkpointing on
    assert module.model.model.diffusion_model.training and module.model.control_model.training
    module.eval()
    assert not module.model.control_model.training


def test_checkpoint_holds_trainable_tensors_and_refuses_foreign_ones():
    cfg = dict(load_config(TINY_CONFIG))
    module = ColorControlModule(tiny_model("v2"), config=cfg)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"model." + k for k in export_keys(module.model)}
    module.on_load_checkpoint(ckpt)  # its own checkpoint is fine
    other = ColorControlModule(tiny_model("v2"), config={**cfg, "model": {**cfg["model"], "color_variant": "v3"}})
    with pytest.raises(CheckpointError, match="another model config"):
        other.on_load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="other locked SD weights"):  # resumed on another --init
        ColorControlModule(tiny_model("v2", seed=1), config=cfg).on_load_checkpoint(ckpt)
    ckpt["state_dict"].pop("model.control_model.input_hint_block.0.weight")
    with pytest.raises(CheckpointError, match="lacks 1 trainable"):
        module.on_load_checkpoint(ckpt)


def test_moved_locked_channels_are_caught_at_checkpoint_time():
    module = ColorControlModule(tiny_model("v2"))
    module.on_train_start()
    with torch.no_grad():
        module.model.model.diffusion_model.input_blocks[0][0].weight[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="locked SD channels changed"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_image_grid_is_reference_gray_sample_truth():
    module = ColorControlModule(tiny_model("v2"))
    grid = module.image_grid(tiny_batch(2), n=2, steps=2)
    assert grid.shape == (3, 2 * 64 + 3 * 2, 4 * 64 + 5 * 2)
    assert 0 <= grid.min() and grid.max() <= 1
    assert module.training  # restored


def test_atomic_save_leaves_old_file_on_failure_and_no_temp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=00000005.ckpt"
    io.save_checkpoint({"global_step": 5, "w": torch.ones(3)}, path)
    assert is_complete_checkpoint(path) and os.listdir(tmp_path) == [path.name]

    def dies_half_way(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6}, path)
    assert os.listdir(tmp_path) == [path.name]
    assert torch.load(path, weights_only=True)["global_step"] == 5


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    for step in (3, 10):
        io.save_checkpoint({"global_step": step}, tmp_path / f"step={step:08d}.ckpt")
    (tmp_path / "step=00000020.ckpt").write_bytes(b"PK\x03\x04 truncated")  # e.g. a copy cut short
    (tmp_path / ".step=00000030.ckpt.abc.tmp").write_bytes(b"partial")       # a killed save
    assert find_resume_checkpoint(tmp_path).name == "step=00000010.ckpt"
    assert [p.name for p in remove_partial_checkpoints(tmp_path)] == [".step=00000030.ckpt.abc.tmp"]
    assert find_resume_checkpoint(tmp_path / "missing") is None
