"""Checkpoints inside a point (qcard.checkpoint and the training loop's resume), in-process and cheap.
The fault tests with killed `qcard run` processes are in test_checkpoint_faults.py."""
import os
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

from qcard.checkpoint import Checkpointer, ResumableShuffle, rng_state, set_rng_state
from qcard.methods.base import PointData, RunContext
from qcard.training import TrainRecipe, train


class Indexed(torch.utils.data.Dataset):
    """Image i is a seeded random 1×8×8 tensor, label i % 4; counts the images it loads."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(3)
        self.x, self.y, self.loads = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 4, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads += 1
        return self.x[i], self.y[i]


def _data(n=96):
    return PointData(Indexed(n), Indexed(16), 4, (1, 8, 8), batch_size=16)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(1), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))


RECIPE = TrainRecipe(epochs=3, batch_size=16, grad_accumulation=2, optimizer="adam", lr=1e-3,
                     augment="shift", shift_px=1, schedule="cosine")      # 6 mini-batches, 3 steps per epoch


class Stop(Exception):
    pass


def _train(ck=None, stop_after=None, recipe=RECIPE, logs=None):
    """(weights, training stats less seconds, the next global draw), or None when stopped after a save."""
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    model = _model()
    if stop_after is not None:
        save = ck.save

        def save_then_stop(step, state):
            save(step, state)
            if step == stop_after:
                raise Stop
        ck.save = save_then_stop
    ctx = RunContext(seed=0, progress=False, log=(logs.append if logs is not None else lambda m: None),
                     checkpoint=ck)
    try:
        log = train(model, _data(), recipe, ctx)
    except Stop:
        return None
    stats = log.to_stats()
    stats.pop("seconds")
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), stats, torch.rand(3), np.random.rand()


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.mark.parametrize("stop_after", [2, 3, 7, 9])     # mid-epoch, epoch end, mid-epoch 3, the last step
def test_a_resumed_run_ends_bit_identical(tmp_path, stop_after):
    ref = _train()
    assert _train(Checkpointer(tmp_path, "s0", "fp", every_steps=1), stop_after) is None
    logs = []
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=100)
    resumed = _train(ck, logs=logs)
    assert ck.resumed_from == {"step": stop_after}
    assert any(f"resumed from the checkpoint of step {stop_after}" in m for m in logs)
    assert _same(resumed, ref)
    assert resumed[1]["steps"] == 9 and len(resumed[1]["curve"]) == 3


def test_without_a_checkpoint_the_run_is_unchanged_and_saves_on_schedule(tmp_path):
    saved = []
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=4)
    save = ck.save
    ck.save = lambda step, state: (saved.append(step), save(step, state))
    assert _same(_train(ck), _train())
    assert saved == [4, 8, 9]                  # every 4 steps, and the last
    assert ck.resumed_from is None


def test_the_shuffle_is_random_samplers_order_and_starts_mid_epoch_without_loading():
    ds = Indexed(50)
    plain = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    ours = _data().loader(ds, shuffle=True, seed=7, batch_size=8)
    assert isinstance(ours.sampler, ResumableShuffle)
    for _ in range(3):                          # epochs: the generator advances the same way
        assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in ours]
    state = ours.generator.get_state()
    full = [y.tolist() for _, y in ours]
    ours.generator.set_state(state)
    ours.sampler.start_at(2 * 8)
    ds.loads = 0
    assert [y.tolist() for _, y in ours] == full[2:]
    assert ds.loads == 50 - 16                  # the skipped images were never loaded


def test_rng_state_round_trips_every_global_stream():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    s = rng_state()
    a = (torch.rand(4), random.random(), np.random.rand(3))
    set_rng_state(s)
    b = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_writes_are_atomic_with_the_umask_and_other_runs_checkpoints_are_ignored(tmp_path):
    old = os.umask(0o027)
    try:
        Checkpointer(tmp_path, "s0", "fp-a").save(3, {"w": torch.ones(2)})
    finally:
        os.umask(old)
    path = tmp_path / "checkpoint-s0.pt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-s0.pt"]          # no temporary file left
    assert torch.equal(Checkpointer(tmp_path, "s0", "fp-a").load()["w"], torch.ones(2))
    logs = []
    other = Checkpointer(tmp_path, "s0", "fp-b", log=logs.append)
    assert other.load() is None and other.resumed_from is None
    assert "another config" in logs[0] and "starts from step 0" in logs[0]


def test_a_corrupt_or_unsafe_checkpoint_is_never_loaded(tmp_path):
    logs = []
    ck = Checkpointer(tmp_path, "s0", "fp", log=logs.append)
    ck.save(3, {"w": torch.zeros(1000)})
    raw = bytearray(ck.path.read_bytes())
    raw[-100] ^= 0xFF                            # one flipped byte inside the payload
    ck.path.write_bytes(bytes(raw))
    assert ck.load() is None and "truncated or corrupt" in logs[-1]
    ck.save(3, {"w": torch.zeros(1), "object": Stop()})     # pickled code: weights_only refuses it
    assert ck.load() is None and "cannot be read" in logs[-1]
    ck.path.write_bytes(b"")
    assert ck.load() is None and "no header" in logs[-1]


def test_a_state_that_does_not_fit_is_rolled_back_and_the_run_starts_over(tmp_path):
    ref = _train()
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=1)
    assert _train(ck, stop_after=2) is None
    snap = Checkpointer(tmp_path, "s0", "fp").load()
    snap["optimizer"]["param_groups"] = snap["optimizer"]["param_groups"] * 2       # another optimizer
    Checkpointer(tmp_path, "s0", "fp").save(2, snap)
    logs = []
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=100, log=logs.append)
    again = _train(ck, logs=logs)
    assert ck.resumed_from is None and any("does not fit this run" in m for m in logs)
    assert _same(again, ref)


def test_the_checkpoint_block_is_validated_and_leaves_point_ids_alone(write_config):
    from qcard.config import load_config
    from qcard.errors import ConfigError
    base = "experiment: e\nmodels: [qcard:lenet5]\ndataset: qcard:mnist5k\nmethods: [fp32_train]\n"
    plain = load_config(write_config(base)).points()[0]
    with_block = load_config(write_config(base + "checkpoint: {every_steps: 50, keep: true}\n", "b.yaml")).points()[0]
    assert plain.id == with_block.id
    assert with_block.checkpoint.every_steps == 50 and plain.checkpoint.every_minutes == 10.0
    assert with_block.as_config()["checkpoint"] == {"every_steps": 50, "keep": True}
    with pytest.raises(ConfigError, match="every_steps"):
        load_config(write_config(base + "checkpoint: {every_steps: 0}\n", "c.yaml"))


def test_keep_leaves_the_checkpoint_and_enabled_false_writes_none(write_config, tmp_path):
    import qcard
    text = f"""\
experiment: EXP
out: {tmp_path / 'runs'}
models: [qcard:lenet5]
dataset: {{ref: synthetic, input_shape: [1, 28, 28], num_classes: 10, size: 32, batch_size: 32}}
cost: {{profiles: [bitops]}}
checkpoint: {{keep: KEEP, enabled: ENABLED}}
methods: [{{name: fp32_train, params: {{train: {{epochs: 1, batch_size: 16}}}}}}]
"""
    def config(exp, keep, enabled):
        return write_config(text.replace("EXP", exp).replace("KEEP", keep).replace("ENABLED", enabled), f"{exp}.yaml")
    kept = qcard.run(config("kept", "true", "true"), progress=False)
    assert kept.ok and [p.name for p in kept.outcomes[0].folder.glob("checkpoint-*.pt")] == ["checkpoint-seed0.pt"]
    off = qcard.run(config("disabled", "true", "false"), progress=False)
    assert off.ok and not list(off.outcomes[0].folder.glob("checkpoint-*.pt"))


def test_a_stage_has_its_own_file_and_fingerprint_and_is_reported(tmp_path):
    ck = Checkpointer(tmp_path, "seed0", "fp")
    recon = ck.stage("adaround")
    recon.save(7, {"layer": 2, "alpha": torch.ones(3)})
    assert recon.path.name == "checkpoint-seed0-adaround.pt" and not ck.path.exists()
    logs = []
    rerun = Checkpointer(tmp_path, "seed0", "fp", log=logs.append)
    assert rerun.load() is None and not logs                    # the run's own loop has no checkpoint
    assert rerun.stage("adaround").load()["layer"] == 2
    assert rerun.resumed() == [{"stage": "adaround", "step": 7}]
    other = Checkpointer(tmp_path, "seed0", "fp", log=logs.append).stage("brecq")
    assert other.load() is None
    with pytest.raises(ValueError, match="stage name"):
        ck.stage("../x")
