import os
import signal

import pytest
import torch

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
