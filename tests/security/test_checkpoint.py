"""A training checkpoint is data: a planted or corrupted `state.pt` is refused, never unpickled into running code."""

import os
import pickle

import torch

from flowopd.train.state import Checkpoints, rng_state, set_rng_state


class _Payload:
    """Unpickling this runs a command: what a planted checkpoint would do under a full unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_checkpoint_runs_nothing_and_starts_from_scratch(tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoints = Checkpoints(tmp_path / "ckpt", fingerprint="abc")
    checkpoints.folder.mkdir()
    with open(checkpoints.path, "wb") as handle:
        pickle.dump({"fingerprint": "abc", "evil": _Payload(marker)}, handle)
    assert checkpoints.load() is None
    assert not marker.exists()
    assert "not a checkpoint this version can read" in capsys.readouterr().out


def test_checkpoint_round_trips_rng_states_under_weights_only(tmp_path):
    import random

    import numpy as np

    checkpoints = Checkpoints(tmp_path / "ckpt", fingerprint="abc")
    checkpoints.save({"params": {"w": torch.ones(2)}, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = checkpoints.load()
    assert state is not None and torch.equal(state["params"]["w"], torch.ones(2))
    set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert [p.name for p in checkpoints.folder.iterdir()] == ["state.pt"]  # no temp file left behind


def test_planted_symlink_at_a_temp_name_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    checkpoints = Checkpoints(tmp_path / "ckpt", fingerprint="abc")
    checkpoints.folder.mkdir()
    (checkpoints.folder / "state.tmp").symlink_to(target)  # the fixed temp name earlier versions used
    checkpoints.save({"params": {}})
    assert target.read_text() == "keep"
    assert checkpoints.load() is not None
