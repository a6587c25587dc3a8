"""A run's files on disk (`anchoring.runs`): an edit written again replaces the old one whole or
not at all, numbers keep their digits, and damaged files are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anchoring import runs
from anchoring.errors import AnchoringError


def _listing(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_an_edit_written_again_replaces_the_old_one_and_leaves_no_copy(tmp_path):
    out = tmp_path / "edit"
    with runs.staged(out) as tmp:
        (tmp / "summary.json").write_text("old")
    with runs.staged(out, replace=True) as tmp:
        (tmp / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "new"
    assert _listing(out) == ["edit"]  # neither the partial nor the replaced copy is left beside it


def test_an_edit_that_fails_to_arrive_puts_the_earlier_one_back(tmp_path, monkeypatch):
    out = tmp_path / "edit"
    with runs.staged(out) as tmp:
        (tmp / "summary.json").write_text("old")
    real = runs.os.replace
    calls = []

    def flaky(src, dst):  # the old edit moves aside, then the new one fails to take its place
        calls.append((str(src), str(dst)))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(runs.os, "replace", flaky)
    with pytest.raises(OSError, match="No space left"):
        with runs.staged(out, replace=True) as tmp:
            (tmp / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "old"
    assert _listing(out) == ["edit"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_edit_left_beside_its_output_is_cleared_and_a_live_ones_kept(tmp_path):
    """A SIGKILLed `delete` left its hidden `.name.partial-PID` copy (a whole model) for good, and
    one killed between its two renames left the earlier edit under `.name.replaced-PID`."""
    import os

    out, dead, here = tmp_path / "edit", _dead_pid(), runs.HOST
    elsewhere = "0" * 8 if here != "0" * 8 else "1" * 8
    for name in (f".edit.partial-{dead}@{here}", f".edit.partial-{dead}", f".edit.partial-{os.getppid()}@{here}",
                 f".other.partial-{dead}@{here}", f".edit.partial-{dead}@{elsewhere}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("x")
    (tmp_path / f".edit.replaced-{dead}@{here}").mkdir()
    (tmp_path / f".edit.replaced-{dead}@{here}" / "summary.json").write_text("earlier")
    with runs.staged(out, replace=True) as tmp:  # the earlier edit comes back first, then this one replaces it
        assert (out / "summary.json").read_text() == "earlier"
        assert tmp.name == f".edit.partial-{os.getpid()}@{here}"
        (tmp / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "new"
    # kept: a live process's, another name's, and one another machine is writing (its number means nothing here)
    assert _listing(out) == sorted([f".edit.partial-{os.getppid()}@{here}", f".other.partial-{dead}@{here}",
                                    f".edit.partial-{dead}@{elsewhere}", "edit"])


def test_an_existing_folder_is_refused_without_replace(tmp_path):
    out = tmp_path / "edit"
    with runs.staged(out) as tmp:
        (tmp / "a").write_text("x")
    with pytest.raises(OSError):
        with runs.staged(out) as tmp:
            (tmp / "b").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and _listing(out) == ["edit"]


def test_metrics_keep_eight_significant_digits(tmp_path):
    runs.write_metrics_csv(tmp_path / "metrics.csv", ["step", "seed", "loss"], [[0, 1, 1.23456789123], [1, 1, np.nan]])
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,seed,loss", "0,1,1.2345679", "1,1,nan"]


def test_numpy_numbers_that_are_not_finite_are_written_as_null(tmp_path):
    values = {"a": np.float32("nan"), "b": [np.float16("inf"), np.float64(2.5)], "c": np.int64(3)}
    runs.write_json(tmp_path / "s.json", values)
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": [None, 2.5], "c": 3}


def test_damaged_run_files_are_one_error(tmp_path):
    (tmp_path / "summary.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(AnchoringError, match="is corrupt"):
        runs.read_json(tmp_path / "summary.json")
    (tmp_path / "edit.json").write_text("[1, 2]")  # valid JSON, but not a record
    assert runs.edit_record(tmp_path) is None
    for table, why in (("step,loss\n0,1.0\n", "needs step, seed"), ("step,seed,loss\n0,0,abc\n", "non-numeric")):
        (tmp_path / "metrics.csv").write_text(table)
        with pytest.raises(AnchoringError, match=why):
            runs.read_metrics(tmp_path)


def test_a_flipped_bit_in_a_checkpoints_step_is_caught(tmp_path):
    """The checksum covered the tensors only: "231" read as "031" resumed step-231 weights at step 31."""
    import torch

    from anchoring.train.checkpoint import read_checkpoint, save_checkpoint

    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p])
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, 231, {"w": p}, opt, {})
    assert read_checkpoint(path)[0] == 231
    raw = path.read_bytes()
    assert raw.count(b'"step":"231"') == 1
    path.write_bytes(raw.replace(b'"step":"231"', b'"step":"031"'))  # one bit: '2' (0x32) to '0' (0x30)
    with pytest.raises(AnchoringError, match="is corrupt"):
        read_checkpoint(path)


def test_denormal_flushing_is_put_back_as_it_was():
    import torch

    from anchoring.train.skeleton import flush_denormals

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        with flush_denormals():
            pass
        assert torch.tensor([1e-39]).item() == 0.0  # the caller had it on: still on
    finally:
        torch.set_flush_denormal(False)
    with flush_denormals():
        assert torch.tensor([1e-39]).item() == 0.0
    assert torch.tensor([1e-39]).item() != 0.0


def test_a_legal_long_file_name_is_written_atomically(tmp_path):
    """The temporary sibling's suffix took a 245-byte name past the 255-byte limit."""
    from anchoring.atomic import write_atomic

    path = tmp_path / ("d" * 245 + ".json")
    write_atomic(path, "{}")
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [path.name]
    with runs.staged(tmp_path / ("e" * 250)) as tmp:
        (tmp / "x").write_text("y")
    assert (tmp_path / ("e" * 250) / "x").read_text() == "y"


def test_the_current_folder_can_be_the_staged_output(tmp_path, monkeypatch):
    """`anchoring delete RUN --out .` in an empty folder ended in 'Invalid argument: .'."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with runs.staged(Path(".")) as tmp:
        (tmp / "x").write_text("y")
    assert (tmp_path / "here" / "x").read_text() == "y"


def test_written_files_get_the_usual_mode_not_the_temporary_files_private_one(tmp_path):
    """`mkstemp` makes its file 0600; renamed as it is, every summary, table and checkpoint of a run
    would be unreadable to the other users of a shared machine."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        runs.write_atomic(tmp_path / "summary.json", "{}")
        os.umask(0o077)
        runs.write_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600  # a umask that asks for privacy is kept
