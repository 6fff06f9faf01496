"""dbk.datasets' registry of public data (fetch, available) and the her2st loaders; offline (a local HTTP server)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import logging
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dbk
from dbk.datasets import _her2st, _registry
from dbk.datasets._registry import Dataset, RemoteFile


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/partial/<name>`` announces 3000 bytes, sends 7 and drops the connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if not self.path.startswith("/partial/"):
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", "3000")
        self.end_headers()
        self.wfile.write(b"partial")
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """``serve(folder)`` -> (base URL, list of request paths) of an HTTP server on 127.0.0.1 in a thread."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers = []

    def start(folder: Path):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=folder))
        server.requests = []
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def datasetdir(tmp_path, monkeypatch):
    """``dbk.settings.datasetdir`` in a fresh folder; downloads allowed (conftest sets HF_HUB_OFFLINE)."""
    folder = tmp_path / "datasets"
    monkeypatch.setattr(dbk.settings, "_datasetdir", folder)
    for var in _registry.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    return folder


@pytest.fixture
def toy(tmp_path, monkeypatch, serve):
    """A registered dataset ``toy`` (``.ds``) of two files of seeded random bytes in ``.src``, served at ``.base``.

    ``.requests`` lists the paths the server was asked for.
    """
    rng = np.random.default_rng(0)
    src = tmp_path / "remote"
    (src / "sub").mkdir(parents=True)
    base, requests = serve(src)
    files = []
    for rel, n in (("a.bin", 3000), ("sub/b.txt", 50)):
        (src / rel).write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        files.append(RemoteFile(rel, f"{base}/{rel}", _sha256(src / rel), n))
    ds = Dataset("toy", "a toy dataset", "here", "CC0", tuple(files))
    monkeypatch.setitem(_registry.REGISTRY, "toy", ds)
    return SimpleNamespace(ds=ds, files=ds.files, src=src, base=base, requests=requests)


def _set_files(monkeypatch, ds: Dataset, files) -> Dataset:
    new = dataclasses.replace(ds, files=tuple(files))
    monkeypatch.setitem(_registry.REGISTRY, ds.name, new)
    return new


def _no_network(*args, **kwargs):
    raise AssertionError("the downloader was called")


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---- download -------------------------------------------------------------------------------------------------------
def test_fetch_downloads_checks_and_does_not_download_again(toy, datasetdir, dbk_log, capsys):
    dbk_log.set_level(logging.INFO, logger="dbk")
    folder = dbk.datasets.fetch("toy")
    assert folder == datasetdir / "toy"
    for f in toy.files:
        assert _sha256(folder / f.path) == f.sha256
    assert _files_in(folder) == ["a.bin", "sub/b.txt"]  # no temporary files left
    assert sorted(toy.requests) == ["/a.bin", "/sub/b.txt"]
    assert f"Downloading {toy.files[0].url} -> {folder / 'a.bin'}" in dbk_log.text
    assert "Downloading file 'a.bin'" not in capsys.readouterr().err  # pooch's own log line is not printed
    row = dbk.datasets.available().set_index("name").loc["toy"]
    assert row["complete"] and row["n_files"] == 2 and row["folder"] == str(folder)

    assert dbk.datasets.fetch("toy") == folder  # present with the right hash: not fetched again
    assert len(toy.requests) == 2


def test_fetch_shows_a_progress_bar_per_file(toy, datasetdir, capsys):
    dbk.settings.progress = True  # conftest restores it
    dbk.datasets.fetch("toy")
    err = capsys.readouterr().err
    assert "a.bin" in err and "sub/b.txt" in err and "3.00k/3.00k" in err  # names and sizes (3000 B)


def test_fetch_replaces_a_corrupt_local_file(toy, datasetdir, dbk_log):
    folder = dbk.datasets.fetch("toy")
    (folder / "a.bin").write_bytes(b"x" * 3000)  # right size, wrong bytes
    dbk.datasets.fetch("toy")
    assert _sha256(folder / "a.bin") == toy.files[0].sha256
    assert toy.requests == ["/a.bin", "/sub/b.txt", "/a.bin"] and "downloading it again" in dbk_log.text


def test_hash_mismatch_leaves_nothing_under_the_final_name(toy, datasetdir, monkeypatch):
    bad = dataclasses.replace(toy.files[0], sha256="0" * 64)
    _set_files(monkeypatch, toy.ds, [bad, toy.files[1]])
    with pytest.raises(ValueError, match=r"a\.bin: the file downloaded from .* differs from the registered") as err:
        dbk.datasets.fetch("toy")
    msg = str(err.value)
    assert str(datasetdir / "toy" / "a.bin") in msg and bad.url in msg
    assert "0" * 64 in msg and toy.files[0].sha256 in msg  # both hashes
    assert _files_in(datasetdir / "toy") == []  # no partial / temporary file, nothing under the final name


def test_hash_mismatch_keeps_the_file_that_was_there(toy, datasetdir, monkeypatch):
    folder = dbk.datasets.fetch("toy")
    (folder / "a.bin").write_bytes(b"old")
    _set_files(monkeypatch, toy.ds, [dataclasses.replace(toy.files[0], sha256="0" * 64, size=None), toy.files[1]])
    with pytest.raises(ValueError, match="differs from the registered file"):
        dbk.datasets.fetch("toy")
    assert (folder / "a.bin").read_bytes() == b"old" and _files_in(folder) == ["a.bin", "sub/b.txt"]


def test_interrupted_download_leaves_no_partial_file(toy, datasetdir, monkeypatch):
    cut = dataclasses.replace(toy.files[0], url=f"{toy.base}/partial/a.bin")
    _set_files(monkeypatch, toy.ds, [cut, toy.files[1]])
    with pytest.raises(ConnectionError, match=r"download a\.bin \(ChunkedEncodingError: .*IncompleteRead") as err:
        dbk.datasets.fetch("toy")
    msg = str(err.value)
    assert "2 file(s) still missing" in msg and cut.url in msg and toy.files[1].url in msg
    assert str(datasetdir / "toy") in msg
    assert toy.requests == ["/partial/a.bin"]
    assert _files_in(datasetdir / "toy") == []


def test_unreachable_url_is_one_clear_error(toy, datasetdir, monkeypatch):
    gone = dataclasses.replace(toy.files[0], url=f"{toy.base}/nowhere/a.bin")
    _set_files(monkeypatch, toy.ds, [gone, toy.files[1]])
    with pytest.raises(ConnectionError, match=r"could not download a\.bin \(HTTPError: 404") as err:
        dbk.datasets.fetch("toy")
    assert gone.url in str(err.value) and toy.files[1].url in str(err.value)
    assert _files_in(datasetdir / "toy") == []


# ---- offline ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["DBK_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_fails_fast_naming_files_urls_and_folder(toy, datasetdir, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(_registry, "_download", _no_network)
    with pytest.raises(FileNotFoundError, match=f"2 file\\(s\\) missing .* downloads are off \\({var}='1'\\)") as err:
        dbk.datasets.fetch("toy")
    msg = str(err.value)
    for f in toy.files:
        assert str(datasetdir / "toy" / f.path) in msg and f.url in msg and f.sha256 in msg
    assert toy.requests == [] and not (datasetdir / "toy").exists()


def test_offline_names_a_corrupt_file_too(toy, datasetdir, monkeypatch):
    dbk.datasets.fetch("toy")
    (datasetdir / "toy" / "a.bin").write_bytes(b"x" * 3000)
    monkeypatch.setenv("DBK_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing or not the registered ones") as err:
        dbk.datasets.fetch("toy")
    assert f"a.bin differs from the registered file (sha256 {_sha256(datasetdir / 'toy' / 'a.bin')}" in str(err.value)
    assert len(toy.requests) == 2  # only the first fetch's


def test_download_false_fails_fast(toy, datasetdir, monkeypatch):
    monkeypatch.setattr(_registry, "_download", _no_network)
    with pytest.raises(FileNotFoundError, match=r"download=False.*\n.*\n.*a\.bin"):
        dbk.datasets.fetch("toy", download=False)
    assert toy.requests == []


def test_her2st_offline_names_the_section_files(datasetdir, monkeypatch):
    monkeypatch.setenv("DBK_OFFLINE", "1")
    monkeypatch.setattr(_registry, "_download", _no_network)
    with pytest.raises(FileNotFoundError) as err:
        dbk.datasets.her2st(["C3"])
    msg = str(err.value)
    assert "3 file(s) missing" in msg and str(datasetdir / "her2st") in msg
    assert "/data/ST-cnts/C3.tsv.gz" in msg and "/data/ST-imgs/C/C3/5714_HE_BT_D1.jpg" in msg
    assert "B4" not in msg


# ---- a local folder (path=) ---------------------------------------------------------------------------------------
def test_fetch_path_checks_the_folder(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(_registry, "_download", _no_network)
    local = toy.src  # the "remote" folder holds the right files
    assert dbk.datasets.fetch("toy", path=local) == local

    (local / "sub" / "b.txt").write_bytes(b"y" * 50)  # corrupted, same size
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in local.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"b\.txt differs from the registered file \(sha256 [0-9a-f]{64}, expected"):
        dbk.datasets.fetch("toy", path=local)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in local.rglob("*") if p.is_file()} == before  # untouched
    (local / "sub" / "b.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing") as err:
        dbk.datasets.fetch("toy", path=local)
    assert str(local / "sub" / "b.txt") in str(err.value) and toy.files[1].url in str(err.value)
    assert not (local / "sub" / "b.txt").exists() and toy.requests == []  # nothing fetched for a path= copy
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        dbk.datasets.fetch("toy", path=tmp_path / "absent")


def test_unknown_dataset_and_sections():
    with pytest.raises(KeyError, match="her2st"):
        dbk.datasets.fetch("nope")
    with pytest.raises(ValueError, match="B4, C2, C3, C4, C5, C6") as err:
        dbk.datasets.her2st(["B4", "A1"])
    assert "A1" in str(err.value)
    assert _her2st._sections("C2") == ["C2"] and _her2st._sections(["C3", "B4", "C3"]) == ["C3", "B4"]


def test_available_lists_her2st(datasetdir):
    table = dbk.datasets.available()
    assert {"name", "description", "n_files", "MiB", "source", "licence", "folder", "complete"} <= set(table.columns)
    row = table.set_index("name").loc["her2st"]
    assert row["n_files"] == 18 and 25 < row["MiB"] < 30 and row["licence"] == "CC BY 4.0"
    assert row["folder"] == str(datasetdir / "her2st") and not row["complete"]
    assert "her2st_genes" in set(table["name"])


def test_her2st_registry_urls():
    files = _registry.get("her2st").files
    assert len(files) == 18 and len({f.path for f in files}) == 18
    commit = "85df7411b987a7dec3feff9718b869a7a82091ec"
    for f in files:
        assert f.url.startswith(f"https://raw.githubusercontent.com/almaan/her2st/{commit}/data/")
        assert len(f.sha256) == 64 and f.size > 0
    by_path = {f.path: f.url for f in files}
    assert by_path["C2/counts.tsv.gz"].endswith("/data/ST-cnts/C2.tsv.gz")
    assert by_path["C2/spot_selection.tsv"].endswith("/data/ST-spotfiles/C2_selection.tsv")
    assert by_path["B4/BT10737_D2_HE.jpg"].endswith("/data/ST-imgs/B/B4/BT10737_D2_HE.jpg")


def test_import_stays_light():
    code = "import sys, dbk.datasets; print(sorted(m for m in ('spatialdata', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the 785 genes ------------------------------------------------------------------------------------------------
GENES = [f"GENE{i}" for i in range(785)]


def test_her2st_genes_download_is_not_checksum_verified(datasetdir, tmp_path, monkeypatch, dbk_log, serve):
    npy = tmp_path / "remote" / _registry.HER2ST_GENES_FILE
    npy.parent.mkdir()
    np.save(npy, np.array(GENES, dtype=object), allow_pickle=True)  # what Hist2ST's file is: an object array
    base, _ = serve(npy.parent)
    ds = _registry.get("her2st_genes")
    _set_files(monkeypatch, ds, [dataclasses.replace(ds.files[0], url=f"{base}/{npy.name}")])
    assert dbk.datasets.her2st_genes() == GENES
    assert "not checksum-verified" in dbk_log.text
    assert (datasetdir / "her2st_genes" / _registry.HER2ST_GENES_FILE).is_file()

    np.save(npy, np.array(GENES[:700]))  # a changed file at the URL is refused, and nothing is kept
    (datasetdir / "her2st_genes" / _registry.HER2ST_GENES_FILE).unlink()
    with pytest.raises(ValueError, match="785 unique gene symbols, found 700"):
        dbk.datasets.her2st_genes()
    assert _files_in(datasetdir / "her2st_genes") == []


def test_her2st_genes_from_a_folder(tmp_path):
    (tmp_path / "genes_785.txt").write_text("\n".join(GENES) + "\n")
    assert dbk.datasets.her2st_genes(path=tmp_path) == GENES
    np.save(tmp_path / "g.npy", np.array(GENES))  # a plain string array, and a file given directly
    assert dbk.datasets.her2st_genes(path=tmp_path / "g.npy") == GENES
    (tmp_path / "genes_785.txt").write_text("\n".join([*GENES[:-1], GENES[0]]))
    with pytest.raises(ValueError, match=r"duplicates \['GENE0'\]"):
        dbk.datasets.her2st_genes(path=tmp_path)
    with pytest.raises(FileNotFoundError, match="genes_785.txt"):
        dbk.datasets.her2st_genes(path=tmp_path / "empty")


def test_gene_npy_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([Evil()] * 785, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        _her2st.read_gene_file(npy)
    pickle.loads(pickle.dumps(1))  # the pickle module itself is untouched


# ---- the real data (../shared/data/her2st) ------------------------------------------------------------------------
def test_registry_matches_the_local_her2st_copy(her2st_dir):
    """The registry is right: every file's sha256 and size are those of the byte copies in shared/data/her2st."""
    files = _registry.get("her2st").files
    for f in files:
        local = her2st_dir / f.path
        assert local.is_file(), local
        assert local.stat().st_size == f.size, f.path
        assert _sha256(local) == f.sha256, f.path
    for section in _her2st.HER2ST_SECTIONS:  # and the registry names every file of each section folder
        on_disk = {f"{section}/{p.name}" for p in (her2st_dir / section).iterdir() if p.is_file()}
        assert on_disk == {f.path for f in files if f.path.startswith(f"{section}/")}


def test_her2st_from_the_local_copy(her2st_dir, monkeypatch):
    monkeypatch.setattr(_registry, "_download", _no_network)
    slides = dbk.datasets.her2st(["B4"], path=her2st_dir)
    assert list(slides) == ["B4"]
    sdata = slides["B4"]
    assert sdata.attrs["sample"] == "B4"
    table = sdata.tables["table"]
    assert table.shape == (283, 15289)  # 284 selected spots, one without a counts row
    assert len(sdata.shapes["spots"]) == 283
    assert (table.obs["sample"] == "B4").all()
    assert dbk.datasets.her2st_genes(path=her2st_dir)[:3] == ["HPS6", "TNC", "NR1H2"]


def test_her2st_reads_the_folder_in_dbk_her2st(her2st_dir, datasetdir, monkeypatch):
    monkeypatch.setattr(_registry, "_download", _no_network)
    monkeypatch.setenv("DBK_HER2ST", str(her2st_dir))
    slides = dbk.datasets.her2st(["B4"])
    assert slides["B4"].tables["table"].shape == (283, 15289)
    assert not (datasetdir / "her2st").exists()  # read in place: nothing fetched into datasetdir


def test_her2st_dbk_her2st_is_the_default_path_not_a_download(datasetdir, tmp_path, monkeypatch):
    """$DBK_HER2ST is read as path= is (checked, never downloaded into); an explicit path= wins over it."""
    monkeypatch.setattr(_registry, "_download", _no_network)
    (tmp_path / "copy").mkdir()
    monkeypatch.setenv("DBK_HER2ST", str(tmp_path / "copy"))
    with pytest.raises(FileNotFoundError, match=r"3 file\(s\) missing") as err:
        dbk.datasets.her2st(["C3"])
    assert f"Dataset 'her2st' in {tmp_path / 'copy'} ($DBK_HER2ST):" in str(err.value)
    assert str(tmp_path / "copy" / "C3" / "counts.tsv.gz") in str(err.value)
    assert f"(or unset DBK_HER2ST to download them into {datasetdir / 'her2st'})" in str(err.value)
    monkeypatch.setenv("DBK_HER2ST", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"\$DBK_HER2ST='.*absent' is not a folder. Point it at the folder"):
        dbk.datasets.her2st(["C3"])
    with pytest.raises(FileNotFoundError, match="path='.*elsewhere' is not a folder. Pass the folder") as err:
        dbk.datasets.her2st(["C3"], path=tmp_path / "elsewhere")  # path= wins over $DBK_HER2ST
    assert "absent" not in str(err.value) and "pass path=None to download" in str(err.value)
    assert list(tmp_path.joinpath("copy").iterdir()) == []


def test_her2st_download_path_end_to_end(her2st_dir, datasetdir, monkeypatch, serve):
    """Section C6 "downloaded" over HTTP from the shared data lands in datasetdir with the right hashes."""
    base, requests = serve(her2st_dir)
    ds = _registry.get("her2st")
    files = [dataclasses.replace(f, url=f"{base}/{f.path}") for f in ds.files]
    _set_files(monkeypatch, ds, files)
    c6 = [f for f in files if f.path.startswith("C6/")]
    folder = _registry.ensure("her2st", c6)
    assert folder == datasetdir / "her2st"
    assert sorted(p.name for p in (folder / "C6").iterdir()) == [
        "5714_HE_BT_E2.jpg",
        "counts.tsv.gz",
        "spot_selection.tsv",
    ]
    assert all(_sha256(folder / f.path) == f.sha256 for f in c6)
    assert sorted(requests) == sorted(f"/{f.path}" for f in c6)
