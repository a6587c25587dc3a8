"""The default experiment, at full length, must produce the signature result in every seed."""

import pytest
import torch

from anchoring import load_run
from anchoring.domains.colour import HUE_NAMES, named_colours


@pytest.mark.slow
def test_default_experiment_anchors_red_and_orders_the_hues(anchored_run):
    out, stdout = anchored_run
    assert "3/3 seeds anchored" in stdout

    run = load_run(out)  # check independently of the summary the CLI printed
    named = named_colours()
    hues = torch.stack([named[n] for n in HUE_NAMES])
    z = run.encode(hues)  # (seeds, 12, 4)
    assert z.shape == (3, 12, 4)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3, 12), atol=1e-5)
    red_cos = z[:, 0, 0]  # anchor is (1, 0, 0, 0)
    assert (red_cos >= 0.9).all(), red_cos
    angles = torch.atan2(z[..., 1], z[..., 0])
    steps = torch.remainder(torch.roll(angles, -1, dims=1) - angles + torch.pi, 2 * torch.pi) - torch.pi
    for s in range(3):  # every step between neighbouring hues turns the same way, once round
        assert (steps[s] > 0).all() or (steps[s] < 0).all(), steps[s]
        assert abs(abs(float(steps[s].sum())) - 2 * torch.pi) < 1e-3
    # vibrant colours live in the hue plane: little energy in dims 2-3 (a random direction has 0.5)
    off_plane = z[..., 2:].pow(2).sum(-1)
    assert off_plane.mean() < 0.1 and off_plane.max() < 0.3, off_plane
    # decode(encode(x)) reconstructs, with arbitrary leading dims
    grid = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(0))
    lat = run.encode(grid)
    assert lat.shape == (3, 2, 5, 4)
    assert (run.decode(lat) - grid).abs().max() < 0.05
