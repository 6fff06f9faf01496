"""What dbk writes, replaces and never deletes (issue 23): model folders and zarr stores are replaced only when dbk
marked them as its own, outputs never swallow inputs, concurrent saves have one winner, a crash mid-swap is recovered,
leftovers of dead writers are cleaned, and a saved model's config is validated before anything is built."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import dbk
from dbk._utils import leftovers, tidy
from dbk.core._folder import checksums_ok, read_model_folder, write_model_folder
from dbk.io._write import STORE_MARKER
from dbk.pp._corpus import MARKER, _triage
from dbk.tl import DiffBulk, fit_diffbulk

FMT = "dbk.Test"
TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 2,
        "log_every": 5}
FIT = {"preset": "tiny", "pretrain_steps": 3, "pretrain_kwargs": TINY, "tile_size_um": 28.0, "fm_size_px": 32,
       "fusion": "gated", "max_epochs": 3, "random_state": 0}


@pytest.fixture(scope="module")
def model():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    dbk.settings.progress = False
    m = fit_diffbulk(dbk.datasets.synthetic(shape=(512, 512), n_genes=8, random_state=0), copy=True, **FIT)
    yield m
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save(tmp_path_factory.mktemp("saved") / "model")


def _small(path, text="v1", **kw):
    """A tiny model folder (no tensors): what the fault-injection tests repeat."""
    return write_model_folder(path, format=FMT, format_version=1, config={"k": 1}, files={"a.txt": text}, **kw)


def _read(path):
    return read_model_folder(path, format=FMT, format_version=1, what="Test")


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# ---- 1, 17: a folder that is not a dbk model is never replaced; ~ and "." ------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_model(model, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\chapter{One}")
    (thesis / "figs").mkdir()
    (thesis / "figs" / "a.png").write_bytes(b"png")
    with pytest.raises(FileExistsError, match=r"thesis is not a dbk model folder .*would lose 2 files, e\.g\. "
                                              r"chapter1\.tex, figs/a\.png"):
        model.save(thesis, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"] and _tree(thesis) == {
        "chapter1.tex": b"\\chapter{One}", "figs/a.png": b"png"}
    # a dbk model folder into which the user put a file of their own is not replaced either
    path = model.save(tmp_path / "m")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds 1 files dbk did not write \(e\.g\. notes\.txt\)"):
        model.save(path, overwrite=True)
    (path / "notes.txt").unlink()
    model.save(path, overwrite=True)  # its own folder: replaced
    assert DiffBulk.load(path, device="cpu").genes == model.genes


def test_home_and_current_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _small("~/m")
    assert (tmp_path / "home" / "m" / "config.json").is_file() and not (tmp_path / "~").exists()
    assert _read("~/m")["k"] == 1
    for here in (".", str(tmp_path)):
        with pytest.raises(ValueError, match="Cannot write the model onto .*it is the current folder"):
            _small(here, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


# ---- 2: zarr stores: overwrite=False by default, only dbk's stores replaced; CLI outputs never contain inputs -------


def test_write_zarr_replaces_only_its_own_stores(tmp_path):
    sdata = dbk.datasets.synthetic(shape=(128, 128), n_genes=4, random_state=0)
    path = dbk.io.write_zarr(sdata, tmp_path / "a.zarr")
    assert json.loads((path / STORE_MARKER).read_text())["dbk_store"] == 1
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        dbk.io.write_zarr(sdata, path)  # the default no longer replaces
    dbk.io.write_zarr(sdata, path, overwrite=True)  # its own store
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("n")
    with pytest.raises(FileExistsError, match=r"data is not a store dbk wrote \(no dbk_store.json\); replacing it "
                                              r"would lose 1 files, e\.g\. notes\.txt"):
        dbk.io.write_zarr(sdata, data, overwrite=True)
    assert (data / "notes.txt").read_text() == "n"


def test_cli_outputs_never_contain_or_lie_inside_an_input(tmp_path, monkeypatch):
    from dbk.cli import main

    monkeypatch.chdir(tmp_path)
    data = Path("data")
    (data / "slide.zarr").mkdir(parents=True)
    (data / "slide.zarr" / "zarr.json").write_text("{}")
    (data / "notes.txt").write_text("keep")
    before = _tree(data)
    with pytest.raises(SystemExit, match=r"--out data contains the input data/slide.zarr: writing there would "
                                         r"delete it \(2 files"):
        main(["predict", "model", "data/slide.zarr", "--out", "data", "--overwrite"])
    with pytest.raises(SystemExit, match="--out data contains the input data/slide.zarr"):
        main(["fit", "data/slide.zarr", "--out", "data", "--overwrite"])
    with pytest.raises(SystemExit, match="--out data/slide.zarr/pred lies inside the input data/slide.zarr"):
        main(["predict", "model", "data/slide.zarr", "--out", "data/slide.zarr/pred"])
    with pytest.raises(SystemExit, match="--out data/slide.zarr/c lies inside the input data/slide.zarr"):
        main(["prepare", "data/slide.zarr", "--out", "data/slide.zarr/c", "--scheduler", "none"])
    # an existing output that is not dbk's is refused before any work, also with --overwrite
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"other is not a store dbk wrote .*x\.txt"):
        main(["predict", "model", "data/slide.zarr", "--out", "other", "--overwrite"])
    with pytest.raises(SystemExit, match=r"other is not a dbk model folder .*x\.txt"):
        main(["fit", "data/slide.zarr", "--out", "other", "--overwrite"])
    assert _tree(data) == before and (tmp_path / "other" / "x.txt").exists()


# ---- 4, 5: concurrent saves have exactly one winner; a crash between the renames is recovered (fault injection) ----


def test_concurrent_saves_have_exactly_one_winner(tmp_path):
    t0 = time.perf_counter()
    for i in range(20):
        path = tmp_path / f"m{i}"
        barrier = threading.Barrier(2)
        results = {}

        def save(who, path=path, barrier=barrier, results=results):
            def wait(folder, who=who, barrier=barrier):  # both writers pass the existence check first
                folder.mkdir()
                (folder / "who.txt").write_text(who)
                barrier.wait(timeout=10)

            try:
                write_model_folder(path, format=FMT, format_version=1, config={}, subfolders={"w": wait})
                results[who] = "saved"
            except FileExistsError as err:
                results[who] = err

        threads = [threading.Thread(target=save, args=(w,)) for w in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [w for w, r in results.items() if r == "saved"]
        assert len(won) == 1, results
        lost = next(r for r in results.values() if r != "saved")
        assert "exists (another process wrote it first?); nothing was replaced" in str(lost)
        assert (path / "w" / "who.txt").read_text() == won[0] and checksums_ok(path)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".m{i}.")) == []
    assert time.perf_counter() - t0 < 30


def _crash_between_renames(path, text):
    """Save ``path`` (overwrite) in a child process killed right after the first rename of the swap."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies mid-swap: no finally, no cleanup
        real, calls = os.rename, []

        def rename(src, dst):
            calls.append(src)
            real(src, dst)
            if len(calls) == 1:
                os._exit(3)

        os.rename = rename
        try:
            _small(path, text, overwrite=True)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 3


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    t0 = time.perf_counter()
    for i in range(20):
        path = _small(tmp_path / f"m{i}", "old")
        _crash_between_renames(path, "new")
        assert not path.exists()
        kinds = sorted(lo.kind for lo in leftovers(path))
        assert kinds == ["old", "tmp"] and all(lo.dead for lo in leftovers(path))
        if i % 2:  # the new copy is damaged: the previous one comes back
            tmp = next(lo.path for lo in leftovers(path) if lo.kind == "tmp")
            (tmp / path.name / "a.txt").write_text("half")
        if i % 4 < 2:
            assert _read(path)["k"] == 1  # the next load recovers
            tidy(path)  # (a load only reports the rest; the next save removes it)
        else:
            _small(path, "third", overwrite=True)  # the next save recovers, then replaces
        expect = "third" if i % 4 >= 2 else ("old" if i % 2 else "new")
        assert (path / "a.txt").read_text() == expect and checksums_ok(path)
        assert leftovers(path) == []
    assert time.perf_counter() - t0 < 30


def test_an_error_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    path = _small(tmp_path / "m", "old")
    real = os.rename

    def fail_second(src, dst):
        if Path(src).name == "m" and Path(src).parent.name.startswith(".m.dbk-tmp-"):
            raise OSError(5, "injected I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="injected"):
        _small(path, "new", overwrite=True)
    monkeypatch.undo()
    assert (path / "a.txt").read_text() == "old" and leftovers(path) == []


def test_a_missing_model_names_the_copies_a_live_writer_left(tmp_path):
    path = tmp_path / "m"
    from dbk._utils import _stamp

    (tmp_path / f".m.dbk-old-{_stamp()}-abcd1234").mkdir()  # this process: alive, never touched
    with pytest.raises(FileNotFoundError, match=r"m is not a folder .*an interrupted save left .*\.m\.dbk-old-.*"
                                                r"the previous copy, by pid \d+ .*still running"):
        _read(path)


# ---- 6: leftovers of dead writers are cleaned on the next save, never a live writer's ------------------------------


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    from dbk._utils import _host

    path = _small(tmp_path / "m")
    dead, now = _dead_pid(), int(time.time())
    made = {
        "dead": tmp_path / f".m.dbk-tmp-{_host()}-{dead}-{now}-aaaaaaaa",
        "old_other_host": tmp_path / f".m.dbk-tmp-elsewhere-123-{now - 2 * 86400}-bbbbbbbb",
        "live": tmp_path / f".m.dbk-tmp-{_host()}-{os.getpid()}-{now}-cccccccc",
        "recent_other_host": tmp_path / f".m.dbk-old-elsewhere-123-{now}-dddddddd",
        "dead_old": tmp_path / f".m.dbk-old-{_host()}-{dead}-{now}-eeeeeeee",
    }
    for p in made.values():
        (p / "m").mkdir(parents=True)
        (p / "m" / "big.bin").write_bytes(b"0" * 1000)
    _small(path, "v2", overwrite=True)
    assert sorted(k for k, p in made.items() if p.exists()) == ["live", "recent_other_host"]
    assert (path / "a.txt").read_text() == "v2"


def test_overwriting_a_read_only_model_leaves_nothing(tmp_path):
    """Run as an unprivileged user (root ignores read-only permissions): the previous copy must still go."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            path = _small(root / "m")
            for p in [*path.rglob("*"), path]:
                p.chmod(0o444 if p.is_file() else 0o555)
            _small(path, "v2", overwrite=True)
            code = 0 if sorted(p.name for p in root.iterdir()) == ["m"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    left = sorted(p.name for p in root.iterdir())
    import shutil

    from dbk._utils import rmtree

    rmtree(root) if os.geteuid() == 0 else shutil.rmtree(root, ignore_errors=True)
    assert os.WEXITSTATUS(status) == 0, left


# ---- 10, 12, 16: what a saved model may claim is checked before anything is built -----------------------------------


def _copy(saved, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "m"))


def _edit(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_foundation_model_weights_unavailable_is_an_error(saved, tmp_path, monkeypatch):
    import dbk.tl._embed as embed

    path = _copy(saved, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert not cfg["fm"]["weights_saved"]  # reloaded by name (efficientnet_lite0)
    real = embed.load_foundation_model

    def offline(name, **kw):
        net, dc = real(name, **kw)
        net.dbk_pretrained = False  # what a timm model without cached weights gives offline
        return net, dc

    monkeypatch.setattr(embed, "load_foundation_model", offline)
    with pytest.raises(ValueError, match=r"pretrained weights of the foundation model 'efficientnet_lite0', which "
                                         r"are not available here .*Make the weights available"):
        DiffBulk.load(path, device="cpu")


@pytest.mark.parametrize("fname", ["history.json", "pretrainer/history.json", "pretrainer/model.safetensors"])
def test_every_file_a_model_needs_must_be_listed(saved, tmp_path, fname):
    path = _copy(saved, tmp_path)
    _edit(path, lambda c: c["sha256"].pop(fname))
    (path / fname).write_bytes((path / fname).read_bytes() + b" ")  # then edited
    with pytest.raises(ValueError, match=f"lists no checksum for {fname}: every file a DiffBulk model needs"):
        DiffBulk.load(path, device="cpu")


def test_fm_weights_file_must_be_listed(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit(path, lambda c: c["fm"].__setitem__("weights_saved", True))
    with pytest.raises(ValueError, match="lists no checksum for fm.safetensors"):
        DiffBulk.load(path, device="cpu")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.__setitem__("genes", "ABCDEFGH"), r"genes is 'ABCDEFGH'; expected a list of gene names"),
    (lambda c: c.__setitem__("tile_size_um", float("nan")), r"tile_size_um is nan; expected a finite number"),
    (lambda c: c.__setitem__("tile_size_um", -28.0), r"tile_size_um is -28.0; expected a finite number"),
    (lambda c: c.__setitem__("format_version", float("inf")), r"corrupt: format_version inf \(expected an integer"),
    (lambda c: c["fm"].__setitem__("size_px", 10**9), r"fm.size_px is 1000000000; expected an integer from 8"),
])
def test_config_values_are_validated(saved, tmp_path, edit, message):
    path = _copy(saved, tmp_path)
    _edit(path, edit)
    with pytest.raises(ValueError, match=rf"config.json: {message}|config.json is {message}|{message}"):
        DiffBulk.load(path, device="cpu")


def test_deeply_nested_config_and_huge_stage1_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "config.json").write_text('{"format": "dbk.DiffBulk", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"config.json is corrupt: nested more than \d+ levels deep"):
        DiffBulk.load(path, device="cpu")
    (path / "config.json").write_text('{"format": "dbk.DiffBulk", "x": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(ValueError, match=r"nested more than \d+ levels deep"):
        DiffBulk.load(path, device="cpu")
    from dbk.core import DiffusionPretrainer

    _copy(saved, tmp_path / "m2")
    s1 = tmp_path / "m2" / "m" / "pretrainer"
    _edit(s1, lambda c: c["preset"].__setitem__("block_out_channels", [8192, 16384]))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"describes a network of [\d,]+ bytes of weights, but .*model.safetensors "
                                         r"holds [\d,]+"):
        DiffusionPretrainer.load(s1, device="cpu")
    assert time.perf_counter() - t0 < 5


# ---- 3, 7: prepare never replaces a folder without its marker; malformed markers; changed sources; writability -----


SETTINGS = {"tile_size_um": 56.0, "fm": "efficientnet_lite0", "fm_size_px": 32, "tiles_key": "dbk_tiles",
            "table_key": "dbk_table"}


def test_prepare_triage_refuses_what_is_not_its_own(tmp_path):
    src = tmp_path / "in" / "s.zarr"
    src.mkdir(parents=True)
    (src / "zarr.json").write_text("{}")
    dest = tmp_path / "out" / "s.zarr"
    dest.mkdir(parents=True)
    (dest / "results.csv").write_text("mine")
    for overwrite in (False, True):
        row = _triage("s", ("path", str(src)), dest, SETTINGS, overwrite)
        assert row["status"] == "failed" and "is not a store dbk prepare wrote (no dbk_prepare.json; it holds 1 " \
            "files); dbk does not replace it" in row["error"]
    (dest / MARKER).write_text("[]")  # malformed: that slide fails, nothing raises
    row = _triage("s", ("path", str(src)), dest, SETTINGS, True)
    assert row["status"] == "failed" and "dbk_prepare.json is malformed" in row["error"]
    # a marker that records the source: the same source is skipped, a changed one is prepared again
    from dbk.pp._corpus import source_fingerprint

    (dest / MARKER).write_text(json.dumps({"dbk_prepare": 1, "settings": SETTINGS,
                                           "source": source_fingerprint(("path", str(src)))}))
    assert _triage("s", ("path", str(src)), dest, SETTINGS, False)["status"] == "skipped"
    (src / "zarr.json").write_text('{"changed": 1}')
    assert _triage("s", ("path", str(src)), dest, SETTINGS, False) is None
    assert (dest / "results.csv").exists()


def test_prepare_marker_is_inside_the_store_and_a_foreign_folder_fails_alone(tmp_path):
    import functools

    slides = {n: functools.partial(dbk.datasets.synthetic, shape=(512, 512), random_state=i)
              for i, n in enumerate(("a", "b"))}
    out = tmp_path / "out"
    (out / "a.zarr").mkdir(parents=True)
    (out / "a.zarr" / "thesis.tex").write_text("mine")
    report = dbk.tl.prepare_corpus(slides, out=out, tile_size_um=56.0, fm_size_px=32, threads=1)
    assert report["status"].tolist() == ["failed", "done"]
    assert "is not a store dbk prepare wrote" in report["error"][0]
    assert (out / "a.zarr" / "thesis.tex").read_text() == "mine"
    marker = json.loads((out / "b.zarr" / MARKER).read_text())
    assert marker["settings"]["fm_size_px"] == 32 and (out / "b.zarr" / STORE_MARKER).is_file()


def test_prepare_checks_the_output_is_writable_before_reading(tmp_path, monkeypatch):
    import tempfile

    read = []

    def slide():
        read.append(1)
        return dbk.datasets.synthetic(shape=(128, 128), random_state=0)

    def no_write(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_write)  # what a read-only folder gives (also to root)
    with pytest.raises(PermissionError, match=r"prepare: cannot write into .*out .*no slide was read"):
        dbk.tl.prepare_corpus({"s": slide}, out=tmp_path / "out")
    assert read == []


def test_a_gene_npy_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    import numpy as np
    from numpy.lib import format as npformat

    from dbk.datasets._her2st import _read_npy_strings

    good = tmp_path / "genes.npy"
    np.save(good, np.array(["ERBB2", "KRT5"]))
    assert _read_npy_strings(good) == ["ERBB2", "KRT5"]
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as fh:  # a valid header declaring 1e12 strings, and 8 bytes of data
        npformat.write_array_header_1_0(fh, {"descr": "<U8", "fortran_order": False, "shape": (10**12,)})
        fh.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"declares an array of shape \(1000000000000,\); expected a 1-D array"):
        _read_npy_strings(huge)
    short = tmp_path / "short.npy"
    with open(short, "wb") as fh:
        npformat.write_array_header_1_0(fh, {"descr": "<U8", "fortran_order": False, "shape": (1000,)})
        fh.write(b"\0" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _read_npy_strings(short)


def test_names_of_older_dbk_temporaries_are_reported_never_removed(tmp_path, caplog):
    import logging
    import os
    import time

    from dbk._utils import tidy

    target = tmp_path / "m"
    target.mkdir()
    old_style = [tmp_path / ".m.abcdefgh.tmp", tmp_path / ".m.old-12345"]  # could be a user's: no writer in the name
    two_days = time.time() - 2 * 24 * 3600
    for d in old_style:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        os.utime(d, (two_days, two_days))
    with caplog.at_level(logging.WARNING, logger="dbk"):
        kept = tidy(target)
    assert all(d.is_dir() and (d / "notes.txt").read_text() == "mine" for d in old_style)
    assert {lo.path for lo in kept} == set(old_style) and "not removed" in caplog.text
