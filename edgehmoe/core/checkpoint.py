"""Model directories: the on-disk format shared by ``edgehmoe fit``, the server and export.

::

    DIR/
      model.json                  # tree, preprocessing, architecture and file of every network
      experts/<node>.safetensors  # one file per expert (node = index in the tree)
      flat.safetensors            # the flat baseline, when present

``model.json`` holds ``format_version``, ``dataset``, ``hierarchy`` (parent array, names,
leaf class ids), ``class_names``, ``input_size``, ``mean``/``std`` (per channel, [0, 1]
units) and ``models`` → ``{"hmoe": {"experts": {node: {name, arch, file, params}}},
"flat": {arch, file, params}}``. Every write is atomic (temporary file, fsync, rename), so a
crash never leaves a half-written checkpoint. numpy + safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from edgehmoe.core.hierarchy import Hierarchy
from edgehmoe.core.kinds import FLAT, HMOE
from edgehmoe.errors import EdgeHmoeError

__all__ = [
    "FORMAT_VERSION",
    "contiguous_arrays",
    "CheckpointError",
    "ModelDir",
    "NetworkEntry",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_model_dir",
]

FORMAT_VERSION = 1
MODEL_JSON = "model.json"


class CheckpointError(EdgeHmoeError, ValueError):
    """A model directory is missing, incomplete or corrupt."""


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    ``durable=False`` skips both fsyncs: readers still never see a torn file, but a power
    loss may keep the old content (for files rewritten often and derivable again, such as
    the server's ``model.json`` and ``live.json``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


@dataclass
class NetworkEntry:
    arch: dict
    file: str
    name: str = ""
    params: int = 0


@dataclass
class ModelDir:
    """In-memory view of ``model.json``; weights are read on demand."""

    path: Path
    hierarchy: Hierarchy
    input_size: int
    mean: list[float]
    std: list[float]
    dataset: str = ""
    experts: dict[int, NetworkEntry] = field(default_factory=dict)
    flat: NetworkEntry | None = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------ writing
    def to_json(self) -> dict:
        models: dict = {}
        if self.experts:
            models[HMOE] = {"experts": {str(k): vars(v) for k, v in sorted(self.experts.items())}}
        if self.flat is not None:
            models[FLAT] = vars(self.flat)
        return {
            "format": "edgehmoe-model",
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "hierarchy": self.hierarchy.to_dict(),
            "class_names": self.hierarchy.class_names(),
            "input_size": self.input_size,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "models": models,
            **({"extra": self.extra} if self.extra else {}),
        }

    def save_json(self) -> None:
        atomic_write_json(self.path / MODEL_JSON, self.to_json())

    def write_expert(self, node: int, arch: dict, arrays: dict[str, np.ndarray], params: int) -> None:
        rel = f"experts/{node}.safetensors"
        atomic_write_bytes(self.path / rel, save(contiguous_arrays(arrays), metadata={"node": str(node)}))
        self.experts[node] = NetworkEntry(arch=arch, file=rel, name=self.hierarchy.names[node], params=params)

    def write_flat(self, arch: dict, arrays: dict[str, np.ndarray], params: int) -> None:
        rel = "flat.safetensors"
        atomic_write_bytes(self.path / rel, save(contiguous_arrays(arrays), metadata={"node": FLAT}))
        self.flat = NetworkEntry(arch=arch, file=rel, name=FLAT, params=params)

    # ------------------------------------------------------------ reading
    def load_weights(self, entry: NetworkEntry) -> dict[str, np.ndarray]:
        f = self.path / entry.file
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the model directory is incomplete (re-run training or export)")
        try:
            return load_file(str(f))
        except Exception as e:  # safetensors raises several types on corrupt files
            raise CheckpointError(f"{f} is not a valid safetensors file ({e}); restore it from a backup or retrain") from None

    @property
    def kinds(self) -> list[str]:
        return ([HMOE] if self.experts else []) + ([FLAT] if self.flat is not None else [])


def contiguous_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # np.ascontiguousarray turns 0-d arrays (BatchNorm's num_batches_tracked) into shape (1,);
    # np.require keeps their shape.
    return {k: np.require(v, requirements="C") for k, v in arrays.items()}


def read_model_dir(path: str | Path) -> ModelDir:
    """Read ``model.json`` and check that it describes a complete model."""
    path = Path(path)
    mj = path / MODEL_JSON
    if not mj.is_file():
        raise CheckpointError(
            f"{path} is not an edgehmoe model directory ({MODEL_JSON} missing); "
            "create one with `edgehmoe fit ... --out DIR` or `edgehmoe-server simulate ... --out DIR`"
        )
    try:
        d = json.loads(mj.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mj} is not valid JSON: {e}") from None
    if d.get("format") != "edgehmoe-model":
        raise CheckpointError(f"{mj} is not an edgehmoe model description (format={d.get('format')!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mj} has format_version {d.get('format_version')}; this edgehmoe reads version {FORMAT_VERSION}"
        )
    try:
        tree = Hierarchy.from_dict(d["hierarchy"])
        models = d.get("models", {})
        experts = {
            int(k): NetworkEntry(**v) for k, v in models.get(HMOE, {}).get("experts", {}).items()
        }
        flat = NetworkEntry(**models[FLAT]) if FLAT in models else None
        md = ModelDir(
            path=path,
            hierarchy=tree,
            input_size=int(d["input_size"]),
            mean=list(d["mean"]),
            std=list(d["std"]),
            dataset=d.get("dataset", ""),
            experts=experts,
            flat=flat,
            extra=d.get("extra", {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{mj} is malformed: {e}") from None
    missing = [int(n) for n in tree.internal_nodes if int(n) not in experts]
    if experts and missing:
        raise CheckpointError(
            f"{mj}: experts missing for nodes {missing[:10]} ({tree.names[missing[0]]!r}, ...); "
            "the hierarchical model is incomplete"
        )
    return md
