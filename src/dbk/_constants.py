"""Names of the slots dbk writes. One place for every key, so none is a scattered string literal."""

from __future__ import annotations

# SpatialData element names
TILES_KEY = "dbk_tiles"  # sdata.shapes[...]: the tiles
# sdata.tables[...]: tiles x genes. The design first named it "dbk_tiles" too, but spatialdata >= 0.7 forbids one
# key for two element types, so the table has its own name.
TILES_TABLE_KEY = "dbk_table"
CELLS_KEY = "cells"
TRANSCRIPTS_KEY = "transcripts"
SPOTS_KEY = "spots"
TABLE_KEY = "table"
TISSUE_KEY = "dbk_tissue"
IMAGE_KEY = "he"
PIXEL_SIZE_FIT_KEY = "dbk_pixel_size_fit"  # sdata.attrs[...]: how an estimated pixel size was found (dbk.io.read_st)

# coordinate systems: images live in "global" with an identity transform (H&E pixels); "um" is micrometres
PIXEL_CS = "global"
UM_CS = "um"

# AnnData slots
COUNTS_LAYER = "counts"
MEASURED_LAYER = "measured"  # 1 where a gene was measured on a tile's slide, 0 where absent from the panel
SPATIAL_KEY = "spatial"
PRED_KEY = "dbk_pred"
DIFF_FEATURES_KEY = "X_dbk_diff"
UNS_KEY = "dbk"
UM_PER_PX_KEY = "um_per_px"  # uns["dbk"][...]: level-0 pixel size of the table's tile coordinates

# obs columns
SAMPLE_COL = "sample"
PATIENT_COL = "patient"  # pp.concat: the slides' sdata.attrs["patient"]
N_CELLS_COL = "n_cells"
N_TRANSCRIPTS_COL = "n_transcripts"
TISSUE_FRACTION_COL = "tissue_fraction"
REGION_COL = "region"
INSTANCE_COL = "instance_id"
CELL_TYPE_COL = "cell_type"

# transcripts columns (Xenium / HEST naming)
GENE_COL = "feature_name"
QV_COL = "qv"
CELL_ID_COL = "cell_id"

# probes that are not genes (Xenium naming); excluded from pseudo-bulk by default
CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region_",
    "antisense_",
)

#: ``var`` column of a predicted table (:func:`dbk.tl.predictions_to_adata`): each gene's CV score, the Pearson r of
#: the fit's inner cross-validation on its training slides (:attr:`dbk.tl.DiffBulk.cv_pearson`).
CV_PEARSON_KEY = "dbk_cv_pearson"
#: ``var`` column of :func:`dbk.tl.predictions_to_adata`: whether the model trusts the gene
#: (:attr:`dbk.tl.DiffBulk.cv_trusted`).
CV_TRUSTED_KEY = "dbk_cv_trusted"
