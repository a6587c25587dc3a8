import os
import signal

import pytest
import torch
from torch import nn

from anchoring.kinds.colour.training import train
from anchoring.train import TrainingInterrupted


def params(result):
    return {k: v.detach().clone() for k, v in result.ensemble.params.items()}


def test_same_seed_same_numbers_and_ensemble_equals_single_runs(small_cfg):
    a = train(small_cfg)
    b = train(small_cfg)
    assert torch.equal(a.metrics, b.metrics)  # reproducible, bit for bit
    single = train(small_cfg.model_copy(update={"train": small_cfg.train.model_copy(update={"seed": 1, "seeds": 1})}))
    pa, ps = params(a), params(single)
    for k in pa:  # member for seed 1 of the 2-seed ensemble == a run of seed 1 alone
        assert torch.allclose(pa[k][1], ps[k][0], atol=1e-5), k
    assert torch.allclose(a.metrics[:, 1], single.metrics[:, 0], rtol=1e-4, atol=1e-6)


def test_training_moves_red_towards_its_anchor(small_cfg):
    small_cfg = small_cfg.model_copy(update={"train": small_cfg.train.model_copy(update={"steps": 500})})
    result = train(small_cfg)
    red = torch.tensor([1.0, 0.0, 0.0])
    with torch.no_grad():
        cos = torch.stack([m.encode(red)[0] for m in result.ensemble.members()])
        before = [torch.nn.functional.normalize(m.encoder(red), dim=-1)[0] for m in _fresh_members(small_cfg)]
    assert (cos > 0.8).all(), cos
    assert all(c > b + 0.3 for c, b in zip(cos, before))
    assert result.metrics[-1, :, 1].max() < 0.01  # reconstruction learned
    assert set(result.snapshots) == set(range(0, 501, 50))


def _fresh_members(cfg):
    from anchoring.kinds.colour.objective import build_model
    from anchoring.train import Ensemble

    return Ensemble(lambda: build_model(cfg), list(range(cfg.train.seed, cfg.train.seed + cfg.train.seeds))).members()


class Killed(Exception):
    pass


def test_killed_and_resumed_equals_uninterrupted(small_cfg, tmp_path):
    full = train(small_cfg, tmp_path / "full")

    def kill(step, _result):
        if step == 130:  # dies between checkpoints (100 and 150): steps 100–130 are redone
            raise Killed

    with pytest.raises(Killed):
        train(small_cfg, tmp_path / "broken", callbacks=[kill])
    resumed = train(small_cfg, tmp_path / "broken")
    for k, v in params(full).items():
        assert torch.equal(v, params(resumed)[k]), k
    assert torch.equal(full.metrics, resumed.metrics)
    assert set(full.snapshots) == set(resumed.snapshots)
    assert all(torch.equal(full.snapshots[s], resumed.snapshots[s]) for s in full.snapshots)


def test_ctrl_c_stops_cleanly_with_a_checkpoint(small_cfg, tmp_path):
    full = train(small_cfg)

    def ctrl_c(step, _result):
        if step == 77:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(small_cfg, tmp_path, callbacks=[ctrl_c])
    assert info.value.step == 78
    resumed = train(small_cfg, tmp_path)
    for k, v in params(full).items():
        assert torch.equal(v, params(resumed)[k]), k


def test_every_chunk_of_a_seeds_stream_is_new_and_steps_can_be_drawn_in_any_order():
    """Batches are a pure function of (seed, step): a stream that read step 0 and then a later chunk
    gives what a fresh one gives, and the second chunk is not the first one again."""
    from anchoring.train.data import CHUNK, EnsembleStream

    s, fresh = EnsembleStream([3, 4], batch_size=5, n_labels=2), EnsembleStream([3, 4], batch_size=5, n_labels=2)
    first = s(0).clone()
    assert first.shape == (2, 5, 3) and not torch.equal(s(CHUNK), first)
    assert torch.equal(s(CHUNK + 7), fresh(CHUNK + 7)) and torch.equal(s(7), fresh(7))


def test_weighted_points_draw_by_their_weights_and_refuse_weights_that_cannot_be_sampled():
    from anchoring.train.data import WeightedPoints

    w = WeightedPoints(torch.arange(4.0), torch.tensor([0.0, 1.0, 0.0, 3.0]))  # cdf 0, .25, .25, 1
    # a uniform of exactly 0 or 0.25 must not pick a point of weight 0
    assert w.indices(torch.tensor([0.0, 0.2, 0.25, 0.26, 0.9999])).tolist() == [1, 1, 3, 3, 3]
    assert WeightedPoints(torch.arange(4.0)).indices(torch.tensor([0.0, 0.3, 0.6, 0.9])).tolist() == [0, 1, 2, 3]
    for bad in (torch.zeros(4), torch.ones(3), torch.tensor([1.0, -1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="non-negative, one per point, and not all zero"):
            w.set_weights(bad)


def test_ensemble_members_carry_their_own_buffers_and_captures_carry_no_gradient():
    from anchoring.train.ensemble import Ensemble

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("scale", torch.rand(3))  # drawn from the seed, like the weights

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    ens = Ensemble(Scaled, [1, 2])
    for seed, member in zip((1, 2), ens.members()):
        torch.manual_seed(seed)
        alone = Scaled()
        assert torch.equal(member.scale, alone.scale) and torch.equal(member.lin.weight, alone.lin.weight)
    acts = ens.capture_at("lin", torch.randn(2, 4, 3))
    assert acts.shape == (2, 4, 3) and not acts.requires_grad


def test_ctrl_c_during_the_last_save_waits_for_it_and_then_stops(small_cfg, tmp_path, monkeypatch):
    """The last checkpoint was written outside the stop flag: a Ctrl-C there cut the save short and the
    run started again from its previous checkpoint (from step 0 under 500 steps)."""
    from anchoring.train import skeleton
    from anchoring.train.checkpoint import steps_done

    small_cfg = small_cfg.model_copy(update={"train": small_cfg.train.model_copy(update={"checkpoint_every": 60})})
    assert small_cfg.train.steps % 60  # so the last save is the one after the loop, not a periodic one
    real = skeleton.save_checkpoint

    def stopped_while_saving(path, done, *args, **kwargs):
        if done == small_cfg.train.steps:
            os.kill(os.getpid(), signal.SIGINT)  # handled as soon as this call returns: mid-save
        return real(path, done, *args, **kwargs)

    monkeypatch.setattr(skeleton, "save_checkpoint", stopped_while_saving)
    with pytest.raises(TrainingInterrupted) as info:
        train(small_cfg, tmp_path)
    assert info.value.step == small_cfg.train.steps
    checkpoints = list(tmp_path.glob("*.safetensors"))
    assert checkpoints and all(steps_done(c) == small_cfg.train.steps for c in checkpoints)
