"""Per-section her2st tile tables with foundation-model embeddings, cached as h5ad (used by ``her2st.py``).

One section -> ``read_st_folder`` -> one tile of ``tile_size_um`` centred on each spot (``make_tiles(mode="spots")``)
-> pseudo-bulk from the spot counts (``X`` = log1p of counts per ``target_sum``, normalised over the whole library;
``layers["counts"]``) -> ``embed_tiles`` (tile resampled to ``size_px``) -> ``obsm["X_<model>"]``.

The table keeps every gene of the section (sparse), the tile's pixel bounds in ``obs`` (``x0, y0, x1, y1``) and the
section folder and settings in ``uns["her2st_bench"]``, so methods that need the tile images (DiffBulk: stage-1
pre-training, diffusion features) can reopen them with ``dbk.io.read_st_folder(uns[...]["folder"])``.

Cache: ``<cache>/<section>_<key>.h5ad`` where ``key`` encodes every setting that changes the table (and a short hash of
the section's input files' sizes and mtimes); a changed setting or input makes a new file, never a stale read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
PATIENT = {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C", "C6": "C"}
CACHE_VERSION = 1  # bump when the table's content changes for the same settings


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines a cached section table."""

    tile_size_um: float = 112.0
    size_px: int = 224
    model: str = "efficientnet_lite0"
    pixel_size_um: float | None = None  # None: estimated from the 200 µm spot pitch (~0.688 µm/px on her2st)
    target_sum: float = 1e4

    def key(self) -> str:
        ps = "est" if self.pixel_size_um is None else f"{self.pixel_size_um:g}"
        model = "".join(c if c.isalnum() else "_" for c in self.model)
        return (f"v{CACHE_VERSION}_t{self.tile_size_um:g}um_{self.size_px}px_{model}_ps{ps}"
                f"_ts{self.target_sum:g}")

    @property
    def obsm_key(self) -> str:
        from dbk.tl import model_key

        return model_key(self.model)


def _inputs_digest(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:8]


def cache_path(cache_dir: Path, folder: Path, settings: FeatureSettings) -> Path:
    return Path(cache_dir) / f"{folder.name}_{settings.key()}_{_inputs_digest(folder)}.h5ad"


def build_section(folder: Path, settings: FeatureSettings, *, net=None) -> ad.AnnData:
    """Tile table of one section with its embeddings (not cached; see :func:`section_table`)."""
    import dbk
    from dbk.io import get_pixel_size

    sdata = dbk.io.read_st_folder(folder, pixel_size_um=settings.pixel_size_um)
    dbk.pp.make_tiles(sdata, tile_size_um=settings.tile_size_um, mode="spots")
    dbk.pp.pseudobulk(sdata, source="spots", target_sum=settings.target_sum)
    dbk.tl.embed_tiles(sdata, fm=net if net is not None else settings.model, fm_size_px=settings.size_px,
                       key_added=settings.obsm_key)
    table = sdata.tables["dbk_table"]
    tiles = sdata.shapes["dbk_tiles"]
    inst = table.obs["instance_id"].to_numpy()
    for c in ("x0", "y0", "x1", "y1"):
        table.obs[c] = tiles.loc[inst, c].to_numpy().astype(np.int64)
    if "spot_id" in tiles:
        table.obs["spot_id"] = tiles.loc[inst, "spot_id"].to_numpy()
    px = get_pixel_size(sdata)
    out = table.copy()
    out.obs["sample"] = folder.name
    out.obs["patient"] = PATIENT.get(folder.name, folder.name)
    out.uns["her2st_bench"] = {
        "folder": str(folder.resolve()),
        "settings": json.dumps(asdict(settings)),
        "pixel_size_um": float(px),
        "tile_side_px": int(out.obs["x1"].iloc[0] - out.obs["x0"].iloc[0]) if out.n_obs else 0,
    }
    return out


def section_table(folder: Path, settings: FeatureSettings, cache_dir: Path, *, net=None,
                  log=print) -> tuple[ad.AnnData, bool, float]:
    """(table, read_from_cache, seconds) for one section: the cached h5ad when present, else built and written."""
    path = cache_path(cache_dir, folder, settings)
    t0 = time.perf_counter()
    if path.is_file():
        table = ad.read_h5ad(path)
        saved = json.loads(table.uns["her2st_bench"]["settings"])
        if saved != asdict(settings) or settings.obsm_key not in table.obsm:
            raise RuntimeError(f"Cache {path} does not match the settings {asdict(settings)} (has {saved}); "
                               "delete it.")
        return table, True, time.perf_counter() - t0
    log(f"  preprocessing {folder.name} (read, tiles, pseudo-bulk, {settings.model} embeddings) ...", flush=True)
    table = build_section(folder, settings, net=net)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    table.write_h5ad(tmp, compression="gzip")
    tmp.replace(path)
    return table, False, time.perf_counter() - t0


def check_genes(tables: dict[str, ad.AnnData], genes: list[str]) -> None:
    """Raise with the missing genes per section unless every gene is measured on every section."""
    missing = {s: [g for g in genes if g not in t.var_names] for s, t in tables.items()}
    missing = {s: m for s, m in missing.items() if m}
    if missing:
        lines = "; ".join(f"{s}: {len(m)} missing, e.g. {m[:8]}" for s, m in missing.items())
        raise ValueError(f"Not all {len(genes)} genes are measured on every section ({lines}). The benchmark needs "
                         "genes measured on all sections (targets would be undefined on the others).")


# ---- helpers shared by the her2st diagnostics (her2st_table.py, her2st_stage1_levers.py, her2st_diffusion_sweep.py)

CONTEXT_UM = 300.0  # spatial context radius: the tile and its 8 nearest spots on her2st's 200 µm pitch
SUMMARY_COLS = ("pearson_mean_all", "pearson_mean_top{k}_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all")


def stack(tables: dict, sections: list[str], genes: list[str], obsm_key: str):
    """Concatenate section tables (genes already subset) with ``dbk.pp.concat``; re-attach the features."""
    import dbk

    cat = dbk.pp.concat({s: tables[s] for s in sections}, genes=genes)
    want = pd.Index([f"{s}:{n}" for s in sections for n in tables[s].obs_names])
    feats = np.vstack([np.asarray(tables[s].obsm[obsm_key]) for s in sections])
    pos = want.get_indexer(cat.obs_names)
    if (pos < 0).any():
        raise RuntimeError(f"concat renamed tiles unexpectedly (e.g. {list(cat.obs_names[:3])}).")
    cat.obsm[obsm_key] = feats[pos]
    if list(cat.var_names) != list(genes):
        raise RuntimeError("concat changed the gene order.")
    return cat


def with_context(adata, ctx, key: str, radius_um: float) -> np.ndarray:
    """``[features, their mean within radius_um]`` per section (µm from each section's estimated pixel size)."""
    from dbk.tl import neighbor_mean

    sections = adata.obs["sample"].astype(str).to_numpy()
    um = np.asarray([ctx.tables[s].uns["her2st_bench"]["pixel_size_um"] for s in sections], np.float64)
    coords = np.asarray(adata.obsm["spatial"], np.float64) * um[:, None]
    x = np.asarray(adata.obsm[key], np.float64)
    return np.hstack([x, neighbor_mean(coords, x, radius_um, sections)])


def fmt(values: list[float], digits: int) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def print_table(df: pd.DataFrame, split: str, cols: list[str], methods: list[str]) -> None:
    sub = df[df["split"] == split]
    n_folds = sub["fold"].nunique()
    header = ["method", *cols, "s/fold", "s total"]
    rows = []
    for m in methods:
        r = sub[sub["method"] == m]
        if r.empty:
            continue
        digits = [3 if c.startswith(("pearson", "spearman")) else 4 for c in cols]
        rows.append([m, *[fmt(r[c].tolist(), d) for c, d in zip(cols, digits, strict=True)],
                     f"{r['fit_predict_s'].mean():.1f}", f"{r['fit_predict_s'].sum():.1f}"])
    folds_txt = ", ".join(sub["fold"].unique())
    spread = "mean ± std over folds (ddof=1)" if n_folds > 1 else "one fold"
    print(f"\n{split.upper()}: {n_folds} fold(s) (test {folds_txt}); {spread}; "
          f"{int(sub['n_genes'].iloc[0])} genes")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(f"{v!s:<{w}}" if j == 0 else f"{v!s:>{w}}" for j, (v, w) in enumerate(zip(row, widths,
                                                                                             strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


