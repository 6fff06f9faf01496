"""The shared model-folder base (dbk.core._folder): atomic writes, checksums, format checks, permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import dbk
from dbk.core._folder import load_tensors, read_model_folder, sha256_file, write_model_folder

FMT = "dbk.Test"


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _write(path, *, version=1, overwrite=False, sub=None, **kw):
    tensors = {"w.safetensors": {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}}

    def nested(p):
        p.mkdir()
        (p / "inner.txt").write_text("inner")

    return write_model_folder(path, format=FMT, format_version=version, config={"k": 3, "genes": ["A", "B"]},
                              tensors=tensors, files={"history.json": "[1, 2]"},
                              subfolders={"nested": sub or nested}, overwrite=overwrite, **kw)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_round_trip(tmp_path):
    path = _write(tmp_path / "m")
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == [
        "config.json", "history.json", "nested", "nested/inner.txt", "w.safetensors"]
    cfg = read_model_folder(path, format=FMT, format_version=1, what="Test")
    assert list(cfg)[:3] == ["format", "format_version", "dbk_version"]
    assert cfg["format"] == FMT and cfg["format_version"] == 1 and cfg["dbk_version"] == dbk.__version__
    assert cfg["k"] == 3 and cfg["genes"] == ["A", "B"]
    assert cfg["sha256"] == {f: sha256_file(path / f) for f in ("history.json", "nested/inner.txt", "w.safetensors")}
    t = load_tensors(path, "w.safetensors")
    assert torch.equal(t["a"], torch.arange(6.0).reshape(2, 3)) and t["b"].dtype == torch.int64
    from safetensors import safe_open

    with safe_open(path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"format": FMT}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(path)
    with pytest.raises(ValueError, match="is missing"):
        load_tensors(path, "nope.safetensors")
    with pytest.raises(ValueError, match="distinct relative paths"):
        write_model_folder(tmp_path / "bad", format=FMT, format_version=1, config={}, files={"../x": ""})


def test_checksum_mismatch_and_missing_file_are_detected(tmp_path):
    path = _write(tmp_path / "m")
    data = bytearray((path / "w.safetensors").read_bytes())
    data[-2] ^= 0xFF
    (path / "w.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w.safetensors is corrupt or was changed after saving \(checksum mismatch\)"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")
    path = _write(tmp_path / "m2")
    (path / "nested" / "inner.txt").write_text("changed")
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")
    (path / "nested" / "inner.txt").unlink()
    with pytest.raises(ValueError, match="is incomplete: nested/inner.txt is missing"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")


def test_other_format_newer_version_and_broken_folders_are_refused(tmp_path):
    path = _write(tmp_path / "m", version=2)
    with pytest.raises(ValueError, match=r"holds 'dbk.Test', not a dbk.Other"):
        read_model_folder(path, format="dbk.Other", format_version=2, what="Other")
    with pytest.raises(ValueError, match=r"was written by a newer dbk \(.*format 2\).*Upgrade dbk"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")
    assert read_model_folder(path, format=FMT, format_version=3, what="Test")["k"] == 3  # older layouts still read
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_model_folder(tmp_path / "nothing", format=FMT, format_version=1, what="Test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a saved Test \(no config.json\)"):
        read_model_folder(tmp_path / "empty", format=FMT, format_version=1, what="Test")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is corrupt"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")
    (path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="holds 'list'"):
        read_model_folder(path, format=FMT, format_version=1, what="Test")


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_permissions_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    path = _write(tmp_path / "m")
    assert _mode(path) == dir_mode and _mode(path / "nested") == dir_mode
    for f in ("config.json", "history.json", "w.safetensors", "nested/inner.txt"):
        assert _mode(path / f) == file_mode, f


def test_pretrainer_files_get_the_umask_permissions(tmp_path, umask):
    from dbk.core import DiffusionPretrainer

    umask(0o022)
    model = DiffusionPretrainer(["A", "B"], preset="tiny", image_size=16, block_out_channels=(16, 32), gene_dim=32)
    path = model.save(tmp_path / "stage1")
    assert _mode(path) == 0o755
    assert {f.name: _mode(f) for f in path.iterdir()} == {
        "config.json": 0o644, "ema.safetensors": 0o644, "history.json": 0o644, "model.safetensors": 0o644}
    assert sorted(json.loads((path / "config.json").read_text())["sha256"]) == [
        "ema.safetensors", "history.json", "model.safetensors"]


def test_an_interrupted_write_leaves_the_old_folder_intact(tmp_path):
    path = _write(tmp_path / "m")
    before = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def crash(p):
        p.mkdir()
        (p / "inner.txt").write_text("half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(path, overwrite=True, sub=crash)
    after = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert read_model_folder(path, format=FMT, format_version=1, what="Test")["k"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    # a completed overwrite replaces the folder
    _write(path, overwrite=True, sub=lambda p: (p.mkdir(), (p / "inner.txt").write_text("new")))
    assert (path / "nested" / "inner.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
