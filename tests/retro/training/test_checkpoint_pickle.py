"""Loading a run never unpickles: the optimizer and RNG states are read with
torch.load(weights_only=True), so a planted pickle payload is refused and never runs; the states
this version writes load that way and restore every RNG."""
import random

import numpy as np
import pytest
import torch

from retro.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from retro.base.errors import RetroError


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    weights = {"w": torch.randn(3, 2)}
    save_checkpoint(tmp_path / "run", weights, {"dim": 2}, {"step": 1}, {"optimizer": {"state": {}}})
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker)}, tmp_path / "run" / "checkpoint" / "optimizer.pt")
    with pytest.raises(RetroError, match="refusing to load"):
        load_checkpoint(tmp_path / "run")
    assert not marker.exists(), "the payload ran"
    assert torch.equal(load_checkpoint(tmp_path / "run", with_optimizer=False)["weights"]["w"], weights["w"])


def test_saved_optimizer_and_rng_states_load_without_pickle_and_restore_every_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    random.random(), np.random.standard_normal(), torch.rand(1)  # noqa: B018 - advance every RNG
    saved = rng_state()
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    save_checkpoint(tmp_path / "run", {"w": torch.zeros(1)}, {}, {"step": 1},
                    {"optimizer": opt.state_dict(), "rng": [saved]})
    loaded = load_checkpoint(tmp_path / "run")["optimizer"]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(loaded["rng"][0])
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
