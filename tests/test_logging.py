"""Logs like scanpy's: the verbosity scale, a repeated message once per call, true grid edges, a re-measured ETA."""

from __future__ import annotations

import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import dbk
from dbk._logging import HINT, inner_fits, log_call, logger, once, once_per_call


@pytest.fixture
def verbosity():
    """Restore dbk.settings.verbosity after the test."""
    old = dbk.settings.verbosity
    yield dbk.settings
    dbk.settings.verbosity = old


def _messages(caplog, pattern: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dbk" and re.search(pattern, r.getMessage())]


# ---- verbosity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "number", "level"), [
    (0, 0, logging.ERROR), ("error", 0, logging.ERROR), (1, 1, logging.WARNING), ("warning", 1, logging.WARNING),
    (2, 2, logging.INFO), ("info", 2, logging.INFO), (3, 3, HINT), ("hint", 3, HINT), ("HINT", 3, HINT),
    (4, 4, logging.DEBUG), ("debug", 4, logging.DEBUG), (np.int64(4), 4, logging.DEBUG),
])
def test_verbosity_takes_scanpys_ints_and_names(verbosity, value, number, level):
    verbosity.verbosity = value
    assert verbosity.verbosity == number and type(verbosity.verbosity) is int
    assert logger.level == level
    assert logging.getLevelName(HINT) == "HINT" and logging.INFO > HINT > logging.DEBUG


@pytest.mark.parametrize("bad", [5, -1, "loud", True, 2.0, None])
def test_verbosity_refuses_other_values_and_names_the_choices(verbosity, bad):
    before = (verbosity.verbosity, logger.level)
    with pytest.raises(ValueError, match=r"verbosity must be one of 0 / 'error'.*4 / 'debug'"):
        verbosity.verbosity = bad
    assert (verbosity.verbosity, logger.level) == before


def test_hint_lines_show_at_verbosity_hint_only(verbosity, dbk_log):
    verbosity.verbosity = "info"
    dbk._logging.hint("a hint")
    verbosity.verbosity = "hint"
    dbk._logging.hint("another hint")
    logger.debug("a debug line")
    assert _messages(dbk_log) == ["another hint"]
    assert [r.levelname for r in dbk_log.records] == ["HINT"]


# ---- once per call --------------------------------------------------------------------------------------------------

@once_per_call
def _loop(n: int, *, inner: int = 0) -> str:
    """Logs the same thing n times, a varying thing under one key n times, and calls itself ``inner`` times."""
    for i in range(n):
        logger.info("ridge CV: one slide only.")
        logger.warning("fit: the same warning.")
        logger.info(f"step {i}: varying text", extra=once("step"))
    for _ in range(inner):
        _loop(n)
    return "result"


def test_a_repeated_message_is_logged_once_per_call(verbosity, dbk_log):
    verbosity.verbosity = "hint"
    assert _loop(5) == "result"
    msgs = _messages(dbk_log)
    assert msgs.count("ridge CV: one slide only.") == 1
    assert msgs.count("fit: the same warning.") == 1
    assert [m for m in msgs if m.startswith("step")] == ["step 0: varying text"]  # one key, one line
    # one hint at the end counts what was not shown: 4 + 4 + 4 repeats of 3 messages
    assert msgs[-1].startswith("_loop: 12 repeat(s) of 3 message(s) not shown")
    # the next call starts afresh
    dbk_log.clear()
    _loop(2)
    assert _messages(dbk_log, "one slide only") == ["ridge CV: one slide only."]


def test_nested_calls_share_the_outer_calls_memory_and_outside_a_call_all_lines_show(verbosity, dbk_log):
    verbosity.verbosity = "info"
    _loop(3, inner=4)
    assert _messages(dbk_log, "one slide only") == ["ridge CV: one slide only."]
    assert not _messages(dbk_log, "not shown")  # the count is a hint: not shown at 'info'
    dbk_log.clear()
    for _ in range(3):  # no call around: every line
        logger.info("ridge CV: one slide only.")
    assert len(_messages(dbk_log, "one slide only")) == 3


def test_debug_shows_every_repeat(verbosity, dbk_log):
    verbosity.verbosity = "debug"
    _loop(3)
    assert len(_messages(dbk_log, "one slide only")) == 3
    assert len(_messages(dbk_log, r"^step \d")) == 3


def test_errors_are_never_suppressed(verbosity, dbk_log):
    verbosity.verbosity = "info"
    with log_call("test"):
        for _ in range(2):
            logger.error("prepare: x: failed.")
    assert len(_messages(dbk_log, "failed")) == 2


def test_inner_fits_log_their_information_at_debug(verbosity, dbk_log):
    verbosity.verbosity = "info"
    with inner_fits():
        logger.info("ridge_cv: 6 genes on 24 features, alpha 10.")
        logger.warning("a warning stays a warning.")
    assert _messages(dbk_log) == ["a warning stays a warning."]
    dbk_log.clear()
    verbosity.verbosity = "debug"
    with inner_fits():
        logger.info("ridge_cv: 6 genes on 24 features, alpha 10.")
    assert [r.levelname for r in dbk_log.records] == ["DEBUG"]


def test_the_public_calls_that_loop_log_once_per_call():
    from dbk.pp._corpus import run_corpus  # what dbk.tl.prepare_corpus (and dbk.pp.prepare) run

    wrapper = once_per_call(lambda: None).__code__
    for func in (dbk.tl.fit_diffbulk, dbk.tl.benchmark, dbk.tl.DiffBulk.predict, run_corpus):
        assert func.__code__ is wrapper, func


def _one_slide(n: int = 60, seed: int = 0, noise: float = 0.5) -> ad.AnnData:
    """One slide, a planted linear signal on 12 features, tiles on a line (obsm['spatial'])."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 12))
    y = 1.0 + z @ rng.normal(size=(12, 4)) + noise * rng.normal(size=(n, 4))
    a = ad.AnnData(X=y.astype(np.float32), var=pd.DataFrame(index=[f"g{j}" for j in range(4)]),
                   obs=pd.DataFrame({"sample": ["s0"] * n}, index=[f"t{i}" for i in range(n)]))
    a.obsm["X_fm"] = z
    a.obsm["spatial"] = np.c_[np.arange(n, dtype=float), np.zeros(n)]
    return a


def test_ridge_fits_within_one_call_say_one_slide_only_once(verbosity, dbk_log):
    verbosity.verbosity = "info"
    a = _one_slide()
    with log_call("test"):
        for _ in range(3):
            dbk.tl.RidgeBaseline("cv", alphas=[0.1, 1.0, 10.0]).fit(a, use_rep="X_fm")
    assert len(_messages(dbk_log, "one slide only")) == 1
    assert len(_messages(dbk_log, r"^ridge_cv: 4 genes")) == 1  # the same summary: once
    dbk_log.clear()
    for _ in range(2):
        dbk.tl.RidgeBaseline("cv", alphas=[0.1, 1.0, 10.0]).fit(a, use_rep="X_fm")
    assert len(_messages(dbk_log, "one slide only")) == 2  # outside a call, as before


# ---- the edge of the alpha grid -------------------------------------------------------------------------------------

def test_grid_edge_is_only_a_true_edge():
    from dbk.tl._ridge import DEFAULT_ALPHAS, grid_edge

    assert grid_edge(1e-2, DEFAULT_ALPHAS) == "lower" and grid_edge(1e8, DEFAULT_ALPHAS) == "upper"
    assert all(grid_edge(float(a), DEFAULT_ALPHAS) is None for a in DEFAULT_ALPHAS[1:-1])
    assert grid_edge(1000.0, [1000.0]) is None  # one alpha: a fixed alpha, no grid, no edge
    assert grid_edge(10.0, [10.0, 1.0, 10.0]) == "upper"  # order and duplicates do not matter


def test_edge_message_names_the_edge_and_the_grid(verbosity, dbk_log):
    verbosity.verbosity = "info"
    a = _one_slide(noise=0.01)  # almost no noise: the smallest alpha wins
    dbk.tl.RidgeBaseline("cv", alphas=[1e-3, 1e-2, 1e-1]).fit(a, use_rep="X_fm")
    assert _messages(dbk_log, "edge") == [
        "ridge CV: the best alpha 0.001 is the lower edge of the grid (3 alphas, 0.001 .. 0.1); a smaller alpha (a "
        "weaker penalty) might score better (alphas= widens the grid)."]
    dbk_log.clear()
    one = dbk.tl.RidgeBaseline("cv", alphas=[1000.0]).fit(a, use_rep="X_fm")  # a fixed alpha: no grid
    assert one.alpha_ == 1000.0 and not _messages(dbk_log, "edge")
    dbk_log.clear()
    mid = dbk.tl.RidgeBaseline("cv", alphas=[1e-3, 1e-2, 1e-1, 1.0, 1e6]).fit(_one_slide(noise=3.0), use_rep="X_fm")
    assert 1e-3 < mid.alpha_ < 1e6 and not _messages(dbk_log, "edge")


def test_late_blend_reports_only_true_edges(verbosity, dbk_log):
    """The late blend refits each block with its chosen alpha alone: a one-alpha grid is no edge (was logged)."""
    from dbk.tl._fusion import fit_head
    from dbk.tl._ridge import DEFAULT_ALPHAS

    verbosity.verbosity = "debug"  # the inner fold refits too
    rng = np.random.default_rng(0)
    n = 160
    z_fm, z_diff = rng.normal(size=(n, 12)), rng.normal(size=(n, 8))
    y = 1.0 + z_fm @ rng.normal(size=(12, 4)) + 0.5 * rng.normal(size=(n, 4))
    a = ad.AnnData(X=y.astype(np.float32), var=pd.DataFrame(index=[f"g{j}" for j in range(4)]),
                   obs=pd.DataFrame({"sample": np.repeat([f"s{k}" for k in range(4)], n // 4)},
                                    index=[f"t{i}" for i in range(n)]))
    a.obsm["X_fm"], a.obsm["X_dbk_diff"] = z_fm, z_diff
    head = fit_head(a, fusion="ridge", blend="late")
    fm_alpha = head.block_alpha_[0]
    assert DEFAULT_ALPHAS[0] < fm_alpha < DEFAULT_ALPHAS[-1]  # the informative block: inside the grid
    edges = _messages(dbk_log, "edge of the grid")
    got = [float(re.search(r"best alpha (\S+) is", m).group(1)) for m in edges]
    assert all(g in (DEFAULT_ALPHAS[0], DEFAULT_ALPHAS[-1]) for g in got), edges
    assert fm_alpha not in got


# ---- stage 1: the re-measured time left ----------------------------------------------------------------------------

def test_stage1_remeasures_its_rate_after_the_first_steps(monkeypatch, verbosity, dbk_log):
    import dbk.core._pretrainer as pretrainer_module
    from dbk.core import DiffusionPretrainer, TileArrays

    verbosity.verbosity = "info"
    monkeypatch.setattr(pretrainer_module, "REMEASURE_MIN_STEPS", 2)
    monkeypatch.setattr(pretrainer_module, "REMEASURE_S", 1e9)  # by steps only: step 3 (2 after the first)
    rng = np.random.default_rng(0)
    tiles = TileArrays(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), X=rng.random((8, 2)), genes=["A", "B"])
    model = DiffusionPretrainer(["A", "B"], preset="tiny", image_size=16, block_out_channels=(16, 32), gene_dim=32)
    model.fit(tiles, max_steps=5, batch_size=4, accelerator="cpu")
    lines = _messages(dbk_log, r"img/s")
    assert len(lines) == 1, lines
    m = re.fullmatch(r"fit: step 3/5 at ([\d.e+]+) img/s \(measured over steps 1-3\), about ([\d.]+) min left\.",
                     lines[0])
    assert m, lines[0]
    assert float(m.group(1)) > 0
    # the rate is the measured one: 2 steps left at that rate
    rate = float(m.group(1)) / 4  # steps/s
    assert float(m.group(2)) == pytest.approx(2 / rate / 60, abs=0.051)
