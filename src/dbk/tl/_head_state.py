"""The saved state of a fitted head: the registry of head classes and the checks their ``from_state`` share.

Every head (:class:`MeanPredictor`, :class:`RidgeBaseline`, :class:`MLPBaseline`, :class:`FusionRegressor`,
:class:`RidgeFusionRegressor`) has ``get_state() -> (config, tensors)``: ``config`` a dict of JSON-ready values
(``"class"``, the constructor options, the feature layout ``dims`` / ``obsm_keys`` / ``layer`` and what was chosen in
fitting), ``tensors`` a dict of CPU tensors (what safetensors stores). ``Class.from_state(config, tensors, genes=...)``
rebuilds the fitted head, which predicts exactly as the original; :func:`head_from_state` picks the class from
``config["class"]``. :meth:`dbk.tl.DiffBulk.save` writes the config into ``config.json`` and the tensors into
``head.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .._utils import jsonable


def head_from_state(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    *,
    genes: Sequence[str],
    device: str | torch.device | None = None,
    history: dict | None = None,
    config_file: str | os.PathLike = "the head config",
    tensor_file: str | os.PathLike = "the head tensors",
):
    """The fitted head that ``get_state()`` described, of the class named by ``config["class"]``.

    Parameters
    ----------
    config, tensors
        What the head's ``get_state()`` returned (read back from JSON and safetensors).
    genes
        The head's genes, in output order.
    device
        Where a torch head's network goes (``None``: ``"auto"``, CUDA if available); the others are numpy.
    history
        The head's ``history_`` (training curves, kept outside the state); default empty, or for the ridge heads
        the inner-CV curve of the state.
    config_file, tensor_file
        Where ``config`` and ``tensors`` come from, for error messages.

    Raises
    ------
    ValueError
        If the class is unknown or the state is incomplete, corrupt or does not fit ``genes``; the message names
        ``config_file`` or ``tensor_file`` and the key.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{config_file}: the head config must be a JSON object, got {type(config).__name__}.")
    name = config.get("class")
    if name is None:  # not recorded: the fusion heads of DiffBulk
        name = "RidgeFusionRegressor" if config.get("fusion") == "ridge" else "FusionRegressor"
    classes = head_classes()
    if name not in classes:
        raise ValueError(f"{config_file}: unknown head class {name!r} (key 'class'); dbk knows {list(classes)}.")
    return classes[name].from_state(config, tensors, genes=genes, device=device, history=history,
                                    config_file=config_file, tensor_file=tensor_file)


def head_classes() -> dict[str, type]:
    """``{class name: class}`` of the heads :func:`head_from_state` rebuilds."""
    from ._baselines import MeanPredictor, MLPBaseline
    from ._fusion import FusionRegressor, RidgeFusionRegressor
    from ._ridge import RidgeBaseline

    return {c.__name__: c for c in (MeanPredictor, RidgeBaseline, MLPBaseline, FusionRegressor, RidgeFusionRegressor)}


# ---- shared by the classes' get_state / from_state ------------------------------------------------------------------


def plain(v):
    """JSON-ready values: numpy scalars and arrays, tuples to Python numbers and lists (``None`` stays ``None``)."""
    return jsonable(v, none=None)


def none(v):
    """``None`` for ``None`` or the string ``"None"`` (how h5ad ``uns`` stores it), else ``v``."""
    return None if v is None or (isinstance(v, str) and v == "None") else v


def tensor(a, dtype=np.float64) -> torch.Tensor:
    """A CPU tensor holding a copy of ``a`` as ``dtype`` (contiguous, owning its memory: safetensors-ready)."""
    return torch.from_numpy(np.array(a, dtype=dtype, order="C", copy=True))


def check_class(cls: type, config: Mapping, config_file) -> None:
    """A clear error when ``config`` describes another class of head than ``cls``."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{config_file}: the head config must be a JSON object, got {type(config).__name__}.")
    name = config.get("class")
    if name is not None and name != cls.__name__:
        raise ValueError(f"{config_file} describes a {name} (key 'class'), not a {cls.__name__}.")


def check_genes(genes: Sequence[str], config_file) -> list[str]:
    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        raise ValueError(f"{config_file}: the head's gene list is empty or has duplicates.")
    return genes


def read_layout(config: Mapping) -> tuple[list[int], list[str], str | None]:
    """``(dims, obsm_keys, layer)`` of a head config; KeyError / TypeError / ValueError when invalid."""
    dims = [int(d) for d in config["dims"]]
    keys = [str(k) for k in config["obsm_keys"]]
    if len(dims) != len(keys) or not dims or any(d <= 0 for d in dims):
        raise ValueError(f"'dims' {dims} and 'obsm_keys' {keys} do not describe the feature sets")
    return dims, keys, none(config.get("layer"))


def arrays(tensors: Mapping[str, torch.Tensor], names: Sequence[str], tensor_file, what: str,
           dtype=np.float64) -> dict[str, np.ndarray]:
    """``{name: array copy}`` of the tensors ``names``; a clear error naming the missing ones."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{tensor_file}: the head tensors must be a mapping of names to tensors.")
    missing = [k for k in names if k not in tensors]
    if missing:
        raise ValueError(f"{tensor_file} is not {what}: it lacks the tensors {missing}.")
    out = {}
    for k in names:
        try:
            out[k] = np.array(tensors[k].detach().cpu().numpy(), dtype=dtype)
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{tensor_file}: tensor {k!r} is not a numeric tensor ({err}).") from None
    return out
