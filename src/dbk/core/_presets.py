"""Named sizes of the stage-1 diffusion pretrainer (architecture and training defaults)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class PretrainerPreset:
    """Architecture and training defaults of a :class:`~dbk.tl.DiffusionPretrainer`.

    Attributes
    ----------
    name
        Preset name (``"custom"`` after overrides that change the architecture).
    image_size
        Side of the training images in pixels (the tile is resampled to it).
    block_out_channels, down_block_types, up_block_types, layers_per_block, attention_head_dim, norm_num_groups
        The diffusers ``UNet2DModel`` arguments.
    gene_dim, gene_layers, gene_heads, zscore
        :class:`~dbk.tl.GeneEncoder` arguments.
    batch_size, lr, warmup_steps, lr_decay_ref, max_steps, ema_decay, cond_drop, grad_clip, augment
        Training: per-device batch, AdamW learning rate with linear warm-up and (when ``lr_decay_ref`` is set) the
        EDM2 inverse square-root decay ``lr / sqrt(max(step / lr_decay_ref, 1))``, default number of steps, EMA
        decay (with the ``(1 + step) / (10 + step)`` warm-up), probability of dropping a sample's condition,
        gradient-norm clip, random flips / 90° rotations.
    checkpoint_every, log_every
        Steps between checkpoints (when a checkpoint folder is given) and between history records.
    channels_last, compile
        Speed settings (not architecture): train in the channels-last memory format; wrap the training forward pass
        in ``torch.compile``. Set where measured to help (``benchmarks/device_check.py``).
    """

    name: str
    image_size: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    gene_dim: int = 64
    gene_layers: int = 2
    gene_heads: int = 4
    zscore: bool = True
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay_ref: int | None = None
    max_steps: int = 2000
    ema_decay: float = 0.999
    cond_drop: float = 0.5
    grad_clip: float = 1.0
    augment: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    channels_last: bool = False
    compile: bool = False

    ARCHITECTURE = ("image_size", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                    "attention_head_dim", "norm_num_groups", "gene_dim", "gene_layers", "gene_heads", "zscore")
    _POSITIVE = ("image_size", "layers_per_block", "attention_head_dim", "norm_num_groups", "gene_dim", "gene_layers",
                 "gene_heads", "batch_size", "checkpoint_every", "log_every")

    def __post_init__(self) -> None:
        for f in self._POSITIVE:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"Preset {self.name!r}: {f} must be a positive integer, got {v!r}.")
        for f in ("max_steps", "warmup_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"Preset {self.name!r}: {f} must be an integer >= 0, got {v!r}.")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0):
            raise ValueError(f"Preset {self.name!r}: lr must be positive, got {self.lr!r}.")
        if not 0.0 <= self.cond_drop <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"Preset {self.name!r}: cond_drop must be in [0, 1] and ema_decay in [0, 1), got "
                             f"{self.cond_drop!r} and {self.ema_decay!r}.")
        if not self.block_out_channels or not (len(self.block_out_channels) == len(self.down_block_types)
                                               == len(self.up_block_types)):
            raise ValueError(f"Preset {self.name!r}: block_out_channels, down_block_types and up_block_types must "
                             "have the same, non-zero length.")

    def to_dict(self) -> dict:
        """JSON-ready form.

        Returns
        -------
        dict
            Every field by name, tuples as lists; :meth:`from_dict` restores the preset.
        """
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> PretrainerPreset:
        """Inverse of :meth:`to_dict` (unknown keys raise).

        Parameters
        ----------
        d
            Preset fields by name (lists are turned back into tuples); an unknown field raises ``ValueError``.

        Returns
        -------
        PretrainerPreset
            The preset (checked as at construction).
        """
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown preset fields {sorted(unknown)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, PretrainerPreset] = {
    # For tests and demos: 32 px, two levels, 300 steps. Measured 2026-12-07 on 2 free CPU cores: the README quick
    # start's fit_diffbulk(preset="tiny") took 59 s (stage 1: 50 s for the 300 steps); with one thread 95 s (85 s).
    "tiny": PretrainerPreset(
        name="tiny",
        image_size=32,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        gene_dim=64,
        gene_layers=1,
        batch_size=16,
        lr=2e-3,
        warmup_steps=20,
        max_steps=300,
        checkpoint_every=100,
        log_every=10,
    ),
    # For CPUs (see benchmarks/stage1_throughput.py): 64 px of the 112 µm tile (1.75 µm/px, nuclei still a few
    # pixels wide), three levels of 32 / 64 / 128 channels, one residual block per level, self-attention only in the
    # 16 x 16 middle block: about 1 s per step of 16 tiles on 2 unshared cores. Measured side by side: attention
    # blocks at 16 x 16 in the down / up path too cost ~25 % more per step; (16, 32, 64) channels are ~2.4x faster
    # but leave a third of the parameters for the stage-2 features. The smaller test models show the gene-image
    # link within a few hundred steps (minutes); the default 1000 steps take ~15-20 min.
    "cpu-small": PretrainerPreset(
        name="cpu-small",
        image_size=64,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=32,
        gene_dim=128,
        gene_layers=2,
        batch_size=16,
        lr=1e-3,
        warmup_steps=100,
        max_steps=1000,
        checkpoint_every=250,
        log_every=10,
    ),
    # For one GPU: 128 px of the 112 µm tile (0.875 µm/px), four levels of 64 / 128 / 256 / 256 channels with two
    # residual blocks each and self-attention at 16 x 16 (and in the middle block): 29 M parameters, 203 GFLOP per
    # image for a training step (forward + backward, torch.utils.flop_counter), a third of the paper's U-Net at the
    # same size (625 GFLOP), so that a few minutes on one GPU see ~10^5 tiles and an hour millions. The fair trial of
    # benchmarks/device_check.py trains this architecture; max_steps is sized from the throughput measured on an
    # H200 (THROUGHPUT below).
    "gpu": PretrainerPreset(
        name="gpu",
        image_size=128,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=32,
        norm_num_groups=32,
        gene_dim=256,
        gene_layers=4,
        gene_heads=8,
        batch_size=128,
        lr=5e-4,
        warmup_steps=200,
        lr_decay_ref=20_000,
        max_steps=20_000,  # 20k steps x 128 tiles / 767 images/s = 56 min on an H200, plus ~2 min of compilation
        ema_decay=0.999,
        checkpoint_every=2000,
        log_every=50,
        compile=True,  # measured on an H200: 767 images/s compiled vs 435 eager, 20 GiB vs 47 GiB (channels_last: 321)
    ),
    # The reference setting: 224 px pixel space (0.5 µm/px for a 112 µm tile), EDM2-scale channels, for GPUs.
    "paper": PretrainerPreset(
        name="paper",
        image_size=224,
        block_out_channels=(128, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=64,
        norm_num_groups=32,
        gene_dim=256,
        gene_layers=4,
        gene_heads=8,
        batch_size=64,
        lr=2e-4,
        warmup_steps=2000,
        lr_decay_ref=70_000,
        max_steps=200_000,
        ema_decay=0.9999,
        checkpoint_every=5000,
        log_every=100,
    ),
}


# Measured stage-1 training throughput (images per second, whole training step) of each preset, the machine, the
# date and the command; the start-of-training time estimate and preset="auto" use it.
# peak_gib: peak GPU memory (torch.cuda.max_memory_allocated) at that batch, which sizes the batch on smaller cards.
THROUGHPUT: dict[tuple[str, str], dict] = {
    ("cpu-small", "cpu"): {"images_per_s": 14.6, "batch": 16, "where": "2 CPU cores (2 threads)", "date": "2026-11",
                           "command": "python benchmarks/stage1_throughput.py --presets cpu-small --threads 2"},
    ("gpu", "cuda"): {"images_per_s": 767.1, "batch": 128, "peak_gib": 20.3, "compile_s": 130.0,
                      "where": "one NVIDIA H200 (bf16 autocast, torch.compile, torch 2.11)", "date": "2026-12-04",
                      "command": "python benchmarks/device_check.py --sections env,throughput "
                                 "--configs 'gpu;gpu:compile=1'"},
    ("paper", "cuda"): {"images_per_s": 78.7, "batch": 64, "peak_gib": 130.6,
                        "where": "one NVIDIA H200 (bf16 autocast, no compile, torch 2.11)", "date": "2026-12-04",
                        "command": "python benchmarks/device_check.py"},
}
# peak memory of the gpu preset without torch.compile (the eager kernels keep more activations)
_EAGER_PEAK_GIB = {"gpu": 47.0}


# fit_pretrainer(preset="auto") on a CPU: cpu-small for about 4 min on 2 cores (THROUGHPUT); fit_diffbulk's defaults
# train no stage 1 on a CPU (tl._fit_steps.CPU_DEFAULT_NOTE: 200 and 500 steps did not beat the untrained U-Net)
AUTO_CPU_STEPS = 200


def auto_preset(accelerator: str = "auto") -> str:
    """The preset ``preset="auto"`` picks: ``"gpu"`` when training runs on CUDA, ``"cpu-small"`` otherwise.

    On a CPU ``get_preset("auto")`` also shortens cpu-small to ``AUTO_CPU_STEPS`` (200) steps (a few minutes).

    Parameters
    ----------
    accelerator
        Where training runs: ``"auto"`` (``dbk.settings.device``, then CUDA if available), ``"cpu"``, ``"gpu"``,
        ``"cuda"``, ``"cuda:1"`` ...

    Returns
    -------
    str
        ``"gpu"`` or ``"cpu-small"``.
    """
    import torch

    from .._settings import settings

    acc = settings.device if accelerator in (None, "auto") else str(accelerator)
    if acc in ("gpu",) or acc.startswith("cuda"):
        return "gpu"
    if acc == "auto" and torch.cuda.is_available():
        return "gpu"
    return "cpu-small"


def auto_preset_for(accelerator: str = "auto") -> PretrainerPreset:
    """The preset object of ``preset="auto"`` (:func:`auto_preset`; on CPUs cpu-small with AUTO_CPU_STEPS steps)."""
    name = auto_preset(accelerator)
    return PRESETS[name] if name != "cpu-small" else replace(PRESETS[name], max_steps=AUTO_CPU_STEPS)


def _record(preset: PretrainerPreset, device) -> dict | None:
    if "+custom" in preset.name:
        return None  # another architecture: no measurement applies
    return THROUGHPUT.get((preset.name, getattr(device, "type", str(device))))


def expected_seconds(preset: PretrainerPreset, steps: int, batch_size: int, device) -> tuple[float, str] | None:
    """(seconds, where it was measured) for ``steps`` steps of ``batch_size`` from :data:`THROUGHPUT`, if known."""
    rec = _record(preset, device)
    if rec is None:
        return None
    secs = steps * batch_size / rec["images_per_s"] + (rec.get("compile_s", 0.0) if preset.compile else 0.0)
    return secs, f"{rec['images_per_s']:g} images/s measured on {rec['where']}"


def batch_for_memory(preset: PretrainerPreset, batch_size: int, total_gib: float) -> int:
    """The largest power-of-two batch <= ``batch_size`` whose measured memory fits 85% of a card of ``total_gib``.

    Memory per tile is taken from :data:`THROUGHPUT` (peak at the measured batch, divided by it); without a
    measurement the batch is returned unchanged.
    """
    rec = _record(preset, "cuda")
    if rec is None or "peak_gib" not in rec:
        return batch_size
    peak = rec["peak_gib"] if preset.compile else _EAGER_PEAK_GIB.get(preset.name, rec["peak_gib"])
    per_tile = peak / rec["batch"]
    fits = int(0.85 * total_gib / per_tile)
    if batch_size <= fits:
        return batch_size
    b = 1
    while b * 2 <= fits:
        b *= 2
    return b


def get_preset(preset: str | PretrainerPreset | dict = "cpu-small", **overrides) -> PretrainerPreset:
    """A preset by name, a preset object or a dict, with overrides.

    Names: ``"tiny"`` (tests), ``"cpu-small"`` (CPUs), ``"gpu"`` (one GPU), ``"paper"`` (the reference 224 px
    setting), or ``"auto"`` (``"gpu"`` where CUDA is available, else ``"cpu-small"``; see :func:`auto_preset`).
    Overrides of architecture fields rename the result ``"<name>+custom"``.

    Parameters
    ----------
    preset
        A name (above), a :class:`PretrainerPreset`, or a dict of its fields (named ``"custom"`` unless it says).
    **overrides
        Fields to change (``None`` values are ignored; an unknown field raises ``ValueError``).

    Returns
    -------
    PretrainerPreset
        The preset, with the overrides (the named preset itself when there are none).
    """
    if preset == "auto":
        return get_preset(auto_preset_for(), **overrides)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)} or 'auto'.")
        p = PRESETS[preset]
    elif isinstance(preset, PretrainerPreset):
        p = preset
    elif isinstance(preset, dict):
        p = PretrainerPreset.from_dict({"name": "custom", **preset})
    else:
        raise TypeError(f"preset must be a name, a PretrainerPreset or a dict, got {type(preset).__name__}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return p
    names = {f.name for f in fields(PretrainerPreset)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"Unknown preset fields {sorted(unknown)}; valid: {sorted(names)}.")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    arch_changed = any(k in PretrainerPreset.ARCHITECTURE and overrides[k] != getattr(p, k) for k in overrides)
    if arch_changed and not p.name.endswith("+custom"):
        overrides.setdefault("name", f"{p.name}+custom")
    return replace(p, **overrides)
