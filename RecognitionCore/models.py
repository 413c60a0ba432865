"""The model catalogue: which networks exist, what input they expect, and where their weights come from.

A catalogue is a JSON manifest, ``{"format_version": 1, "models": [entry, ...]}``. An entry is one of two kinds.

A network with its weights::

    {"id": "lung_nodule_unet", "title": "Lung nodule segmentation", "task": "segmentation",
     "labels": {"1": "nodule"},                  # output value -> name; segmentation: 0 is the background
     "spacing_mm": [0.7, 0.7, 1.25],             # x, y, z as ITK spacing (LPS), or null for the input's own
     "intensity": {"type": "window", "hu_min": -1000, "hu_max": 400, "out_min": 0, "out_max": 1, "clip": true},
     "architecture": {"name": "monai.networks.nets.UNet", "args": {"spatial_dims": 3, ...}},
     "weights": {"file": "lung_nodule_unet.pt", "url": "https://...", "sha256": "<64 hex>", "size_bytes": 1234},
     "roi_size": [96, 96, 96], "licence": "Apache-2.0", "description": "...", "source": "https://..."}

``weights.file`` is relative to the manifest's folder; when absent there the file is taken from the user cache
(``$MIR_MODEL_CACHE`` or ``~/.cache/MedicalImageRecognition/models``) or downloaded into it once from ``url``. Every
file is checked against ``sha256`` before use. ``architecture.name`` is imported by path, only from
``monai.networks.nets``, ``monai.apps.detection``, ``RecognitionCore`` and the modules' ``<Module>Lib`` packages.
``intensity`` is ``window`` (HU clipped to [hu_min, hu_max], mapped linearly to [out_min, out_max]) or ``zscore``
(``nonzero``: statistics over non-zero voxels; optional ``out_min``/``out_max``: then rescale the image's min..max).

A MONAI bundle (the model zoo layout ``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``)::

    {"id": "spleen_ct_segmentation", "title": "...", "task": "segmentation",
     "bundle": {"name": "spleen_ct_segmentation", "dir": null}, "licence": "...", "source": "https://..."}

Labels, spacing, intensity, ROI size and the network come from the bundle's own configs; fields given in the entry
take precedence. ``bundle.dir`` (absolute, or relative to the manifest) says where it is; without it the bundle is
looked up by name under ``<cache>/bundles`` and MONAI's download folder (``<torch hub>/bundle``). Bundle configs are
Python code (MONAI's ``$`` expressions): use bundles from a source you trust, as with MONAI itself.

Later manifests override earlier entries with the same id, so a user manifest can re-point a shipped entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import ModelError
from .preprocessing import intensity_spec
from .progress import Progress, as_progress

SHIPPED_CATALOGUE = Path(__file__).resolve().parent / "Resources" / "Models" / "catalogue.json"
CACHE_ENV = "MIR_MODEL_CACHE"
TASKS = ("segmentation", "detection")
ALLOWED_ARCHITECTURE_NAMESPACES = ("monai.networks.nets", "monai.apps.detection", "RecognitionCore")
DOWNLOAD_CHUNK_BYTES = 1 << 16
DOWNLOAD_TIMEOUT_S = 30

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_MODULE_LIB_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9]*Lib$")
_CARD_FIELDS = ("id", "title", "task", "labels", "spacing_mm", "intensity", "architecture", "weights", "bundle",
                "roi_size", "licence", "description", "source", "training", "metrics")
_BUNDLE_DERIVED_FIELDS = ("labels", "spacing_mm", "intensity", "roi_size")
_WEIGHTS_KEYS = ("file", "url", "sha256", "size_bytes")


def sha256_of_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where downloaded weights live: ``$MIR_MODEL_CACHE`` or ``~/.cache/MedicalImageRecognition/models``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "MedicalImageRecognition" / "models"


# ---------------------------------------------------------------------------------------------------------------------
# Model cards


@dataclasses.dataclass
class ModelCard:
    """One catalogue entry, validated: everything needed to prepare the input and to build the network."""

    id: str
    title: str
    task: str
    labels: Dict[int, str] = dataclasses.field(default_factory=dict)
    spacing_mm: Optional[Tuple[float, float, float]] = None
    intensity: Optional[Dict[str, Any]] = None
    architecture: Optional[Dict[str, Any]] = None
    weights: Optional[Dict[str, Any]] = None
    bundle: Optional[Dict[str, Any]] = None
    roi_size: Optional[Tuple[int, int, int]] = None
    licence: str = ""
    description: str = ""
    source: str = ""
    training: Optional[Dict[str, Any]] = None  # how the weights were made: data, starting point, settings
    metrics: Optional[Dict[str, Any]] = None  # measured results, e.g. {"LIDC (2 CTs)": {"CPM": 0.8}}
    base_dir: Optional[Path] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_bundle(self) -> bool:
        return self.bundle is not None

    @classmethod
    def from_dict(cls, data: Dict[str, Any], base_dir=None, origin: str = "") -> "ModelCard":
        """Validate a manifest entry; ``base_dir`` resolves relative paths, ``origin`` names the manifest in errors."""
        where = f" in {origin}" if origin else ""
        if not isinstance(data, dict):
            raise ModelError(f"A model entry{where} must be a JSON object, got {type(data).__name__}")
        model_id = data.get("id")
        if not isinstance(model_id, str) or not model_id.strip():
            raise ModelError(f"A model entry{where} has no 'id' (a non-empty string); entry keys: {sorted(data)}")
        context = f"Model '{model_id}'{where}"
        unknown = sorted(set(data) - set(_CARD_FIELDS))
        if unknown:
            raise ModelError(f"{context}: unknown field(s) {unknown}; known fields: {list(_CARD_FIELDS)}")
        is_bundle = data.get("bundle") is not None
        card = cls(
            id=model_id,
            title=_text(data, "title", context, required=True),
            task=_task(data.get("task"), context),
            labels=_labels(data.get("labels"), data.get("task"), context, required=not is_bundle),
            spacing_mm=_spacing(data.get("spacing_mm"), context),
            intensity=_intensity(data.get("intensity"), context, required=not is_bundle),
            architecture=None if is_bundle else _architecture(data.get("architecture"), context),
            weights=None if is_bundle else _weights(data.get("weights"), context),
            bundle=_bundle(data.get("bundle"), context) if is_bundle else None,
            roi_size=_roi_size(data.get("roi_size"), context),
            licence=_text(data, "licence", context, required=True),
            description=_text(data, "description", context),
            source=_text(data, "source", context),
            training=_json_object(data, "training", context),
            metrics=_json_object(data, "metrics", context),
            base_dir=Path(base_dir) if base_dir is not None else None,
        )
        if is_bundle and (data.get("architecture") is not None or data.get("weights") is not None):
            raise ModelError(f"{context}: a 'bundle' entry takes its network from the bundle; "
                             "remove 'architecture' and 'weights'")
        return card

    def to_dict(self) -> Dict[str, Any]:
        """The manifest entry (JSON-ready), the inverse of ``from_dict``."""
        data: Dict[str, Any] = {"id": self.id, "title": self.title, "task": self.task}
        if self.labels:
            data["labels"] = {str(value): name for value, name in sorted(self.labels.items())}
        for key in ("spacing_mm", "roi_size"):
            value = getattr(self, key)
            if value is not None:
                data[key] = list(value)
        for key in ("intensity", "architecture", "weights", "bundle", "training", "metrics"):
            value = getattr(self, key)
            if value is not None:
                data[key] = json.loads(json.dumps(value))
        data.update(licence=self.licence, description=self.description, source=self.source)
        return data


def add_to_manifest(path, card: "ModelCard") -> Path:
    """Write ``card`` into the manifest at ``path`` (created if missing), replacing an entry with the same id; its
    weights file must sit in the manifest's folder, where the entry's relative path points."""
    path = Path(path)
    document = json.loads(path.read_text()) if path.is_file() else {"format_version": 1, "models": []}
    document["models"] = [entry for entry in document["models"] if entry.get("id") != card.id] + [card.to_dict()]
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _json_object(data, key, context) -> Optional[Dict[str, Any]]:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise ModelError(f"{context}: field '{key}' must be an object, got {value!r}")
    return value


def _text(data, key, context, required=False) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ModelError(f"{context}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def _task(value, context) -> str:
    if value not in TASKS:
        raise ModelError(f"{context}: field 'task' must be one of {list(TASKS)}, got {value!r}")
    return value


def _labels(value, task, context, required) -> Dict[int, str]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or not value:
        raise ModelError(f"{context}: field 'labels' must be a non-empty object {{value: name}}, got {value!r}")
    lowest = 1 if task == "segmentation" else 0
    labels = {}
    for key, name in value.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            number = None
        if number is None or str(number) != str(key).strip() or number < lowest:
            raise ModelError(f"{context}: field 'labels' has key {key!r}; keys are integers >= {lowest}"
                             + (" (0 is the background)" if lowest == 1 else ""))
        if not isinstance(name, str) or not name.strip():
            raise ModelError(f"{context}: field 'labels' names value {key} with {name!r}; names are non-empty strings")
        labels[number] = name
    return labels


def _spacing(value, context) -> Optional[Tuple[float, float, float]]:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in value)):
        raise ModelError(f"{context}: field 'spacing_mm' must be three positive numbers (x, y, z in mm) "
                         f"or null, got {value!r}")
    return tuple(float(v) for v in value)


def _roi_size(value, context) -> Optional[Tuple[int, int, int]]:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ModelError(f"{context}: field 'roi_size' must be three positive integers (voxels) or null, "
                         f"got {value!r}")
    return tuple(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _intensity(value, context, required) -> Optional[Dict[str, Any]]:
    if value is None and not required:
        return None
    try:
        return intensity_spec(value)
    except ModelError as error:
        raise ModelError(f"{context}: field 'intensity': {error}") from None


def _architecture(value, context) -> Dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ModelError(f"{context}: field 'architecture' must be an object {{\"name\": import path, "
                         f"\"args\": {{...}}}}, got {value!r}")
    name = value["name"]
    if not _in_allowed_namespace(name):
        raise ModelError(f"{context}: field 'architecture.name' {name!r} is not in an allowed namespace "
                         f"({', '.join(ALLOWED_ARCHITECTURE_NAMESPACES)}, <Module>Lib)")
    args = value.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ModelError(f"{context}: field 'architecture.args' must be an object of keyword arguments, got {args!r}")
    unknown = sorted(set(value) - {"name", "args"})
    if unknown:
        raise ModelError(f"{context}: field 'architecture' has unknown key(s) {unknown}")
    return {"name": name, "args": dict(args)}


def _in_allowed_namespace(dotted: str) -> bool:
    parts = dotted.split(".")
    if not all(part.isidentifier() and not part.startswith("_") for part in parts):
        return False
    if _MODULE_LIB_PATTERN.match(parts[0]) and len(parts) >= 2:
        return True
    return any(dotted.startswith(prefix + ".") for prefix in ALLOWED_ARCHITECTURE_NAMESPACES)


def _weights(value, context) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelError(f"{context}: field 'weights' must be an object with 'file' and/or 'url' and 'sha256', "
                         f"got {value!r}")
    unknown = sorted(set(value) - set(_WEIGHTS_KEYS))
    if unknown:
        raise ModelError(f"{context}: field 'weights' has unknown key(s) {unknown}; known: {list(_WEIGHTS_KEYS)}")
    weights = {key: value.get(key) for key in _WEIGHTS_KEYS}
    if not weights["file"] and not weights["url"]:
        raise ModelError(f"{context}: field 'weights' needs a 'file' or a 'url'")
    if weights["file"] is not None and (not isinstance(weights["file"], str) or not weights["file"].strip()):
        raise ModelError(f"{context}: field 'weights.file' must be a path string, got {weights['file']!r}")
    if weights["url"] is not None:
        scheme = urllib.parse.urlparse(str(weights["url"])).scheme
        if scheme not in ("http", "https"):
            raise ModelError(f"{context}: field 'weights.url' must be an http(s) URL, got {weights['url']!r}")
    if not isinstance(weights["sha256"], str) or not _SHA256_PATTERN.match(weights["sha256"].lower()):
        raise ModelError(f"{context}: field 'weights.sha256' must be 64 hexadecimal digits, got {weights['sha256']!r}")
    weights["sha256"] = weights["sha256"].lower()
    size = weights["size_bytes"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ModelError(f"{context}: field 'weights.size_bytes' must be a positive integer, got {size!r}")
    return weights


def _bundle(value, context) -> Dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise ModelError(f"{context}: field 'bundle' must be an object {{\"name\": bundle name, \"dir\": folder "
                         f"or null}}, got {value!r}")
    unknown = sorted(set(value) - {"name", "dir"})
    if unknown:
        raise ModelError(f"{context}: field 'bundle' has unknown key(s) {unknown}")
    folder = value.get("dir")
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        raise ModelError(f"{context}: field 'bundle.dir' must be a folder path or null, got {folder!r}")
    return {"name": value["name"], "dir": folder}


# ---------------------------------------------------------------------------------------------------------------------
# Catalogue


class Catalogue:
    """Model cards by id, from the shipped manifest and any user manifests (later ones override earlier ids)."""

    def __init__(self, manifests: Iterable = (SHIPPED_CATALOGUE,)) -> None:
        self._cards: Dict[str, ModelCard] = {}
        for manifest in manifests:
            self.load(manifest)

    @classmethod
    def with_user_manifests(cls, user_dirs: Iterable = ()) -> "Catalogue":
        """The shipped catalogue plus every ``*.json`` manifest in the given folders (missing folders are skipped)."""
        manifests: List[Path] = [SHIPPED_CATALOGUE]
        for folder in user_dirs:
            manifests += sorted(Path(folder).glob("*.json"))
        return cls(manifests)

    def load(self, manifest) -> None:
        """Add the entries of one manifest file; an invalid file raises ``ModelError`` and adds nothing."""
        path = Path(manifest)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"Model catalogue not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ModelError(f"Model catalogue {path} cannot be read: {error}") from None
        except json.JSONDecodeError as error:
            raise ModelError(f"Model catalogue {path} is not valid JSON: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("models"), list):
            raise ModelError(f"Model catalogue {path} must be a JSON object with a 'models' list")
        cards = [ModelCard.from_dict(entry, base_dir=path.parent, origin=str(path)) for entry in document["models"]]
        ids = [card.id for card in cards]
        duplicates = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if duplicates:
            raise ModelError(f"Model catalogue {path} lists these ids more than once: {duplicates}")
        for card in cards:
            self.add(card)

    def add(self, card: ModelCard) -> None:
        """Register (or replace) a card under its id."""
        self._cards[card.id] = card

    def get(self, model_id: str) -> ModelCard:
        if model_id not in self._cards:
            available = ", ".join(sorted(self._cards)) or "none"
            raise ModelError(f"Unknown model '{model_id}'. Available models: {available}")
        return self._cards[model_id]

    def ids(self, task: Optional[str] = None) -> List[str]:
        """Sorted ids, optionally only those for one task ('segmentation' or 'detection')."""
        if task is not None and task not in TASKS:
            raise ModelError(f"Unknown task {task!r}; tasks are {list(TASKS)}")
        return sorted(model_id for model_id, card in self._cards.items() if task is None or card.task == task)

    def __contains__(self, model_id) -> bool:
        return model_id in self._cards

    def __len__(self) -> int:
        return len(self._cards)


# ---------------------------------------------------------------------------------------------------------------------
# Weights: local file, cache, download


def _local_weights_path(card: ModelCard) -> Optional[Path]:
    file_name = card.weights.get("file")
    if not file_name:
        return None
    path = Path(file_name).expanduser()
    if not path.is_absolute() and card.base_dir is not None:
        path = card.base_dir / path
    return path


def cached_weights_path(card: ModelCard, cache_dir=None) -> Path:
    """Where the weights of ``card`` are (or will be) in the cache: ``<cache>/<id>/<file name>``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if card.weights.get("file"):
        name = Path(card.weights["file"]).name
    else:
        name = Path(urllib.parse.urlparse(card.weights["url"]).path).name or f"{card.id}.pt"
    return cache / card.id / name


def resolve_weights(card: ModelCard, cache_dir=None, progress: Optional[Progress] = None,
                    offline: bool = False) -> Path:
    """The path of verified weights: the manifest's local file, else the cache, else downloaded once into the cache."""
    if card.weights is None:
        raise ModelError(f"Model '{card.id}' is a MONAI bundle; its weights are inside the bundle folder")
    progress = as_progress(progress)
    expected = card.weights["sha256"]
    local = _local_weights_path(card)
    if local is not None and local.is_file():
        _check_sha256(local, expected, card)
        progress.report(1.0, f"Weights of {card.title} found")
        return local
    cached = cached_weights_path(card, cache_dir)
    if cached.is_file():
        actual = sha256_of_file(cached)
        if actual == expected:
            progress.report(1.0, f"Weights of {card.title} found in the cache")
            return cached
        if offline or not card.weights.get("url"):
            raise ModelError(f"The cached weights {cached} of model '{card.id}' are damaged (SHA-256 {actual}, "
                             f"expected {expected}). Delete the file and download it again.")
        cached.unlink()
    if not card.weights.get("url"):
        places = f"{local} or {cached}" if local is not None else str(cached)
        raise ModelError(f"Weights of model '{card.id}' not found and the catalogue gives no download URL. "
                         f"Place the file at {places} (SHA-256 {expected}).")
    if offline:
        raise ModelError(f"Weights of model '{card.id}' are not in the cache and downloads are off. Download "
                         f"{card.weights['url']} and place the file at {cached} (SHA-256 {expected}).")
    _download(card, cached, progress)
    return cached


def _check_sha256(path: Path, expected: str, card: ModelCard) -> None:
    actual = sha256_of_file(path)
    if actual != expected:
        raise ModelError(f"Weights file {path} of model '{card.id}' fails its checksum: SHA-256 {actual}, expected "
                         f"{expected}. The file is damaged or is another version; replace it.")


def _download(card: ModelCard, target: Path, progress: Progress) -> None:
    """Stream ``card``'s URL into a ``.part`` file next to ``target``; rename it only once its SHA-256 is right."""
    url = card.weights["url"]
    expected = card.weights["sha256"]
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, part_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    part = Path(part_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(descriptor, "wb") as stream:
            progress.report(0.0, f"Downloading {card.title}")
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "MedicalImageRecognition"})
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    total = int(response.headers.get("Content-Length") or card.weights.get("size_bytes") or 0)
                    received = 0
                    for chunk in iter(lambda: response.read(DOWNLOAD_CHUNK_BYTES), b""):
                        stream.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        fraction = min(received / total, 1.0) if total else 0.0
                        progress.report(0.99 * fraction,
                                        f"Downloading {card.title}: {received / 1e6:.1f} of {total / 1e6:.1f} MB")
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
                if isinstance(error, urllib.error.HTTPError):
                    reason = f"the server answered HTTP {error.code} {error.reason}"
                else:
                    reason = f"{getattr(error, 'reason', None) or error}; no network?"
                raise ModelError(f"Model '{card.id}' could not be downloaded from {url} ({reason}). Download the "
                                 f"file by other means and place it at {target} (SHA-256 {expected}).") from None
        actual = digest.hexdigest()
        if actual != expected:
            raise ModelError(f"The file downloaded from {url} for model '{card.id}' fails its checksum: SHA-256 "
                             f"{actual}, expected {expected}. It was discarded; the server may hold another "
                             "version than the catalogue.")
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    progress.report(1.0, f"Downloaded {card.title}")


# ---------------------------------------------------------------------------------------------------------------------
# Networks


def build_architecture(architecture: Dict[str, Any]):
    """Instantiate ``{"name": import path, "args": {...}}``: a torch Module class or factory in an allowed namespace."""
    import torch

    name = architecture["name"]
    if not _in_allowed_namespace(name) or "." not in name:
        raise ModelError(f"Architecture {name!r} is not in an allowed namespace "
                         f"({', '.join(ALLOWED_ARCHITECTURE_NAMESPACES)}, <Module>Lib)")
    module_name, attribute = name.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"Architecture {name!r}: cannot import {module_name} ({error})") from None
    target = getattr(module, attribute, None)
    is_module_class = inspect.isclass(target) and issubclass(target, torch.nn.Module)
    if not (is_module_class or inspect.isfunction(target)) or not _in_allowed_namespace(
            f"{getattr(target, '__module__', '')}.{attribute}"):
        raise ModelError(f"Architecture {name!r} is not a network class or factory defined in an allowed namespace")
    try:
        network = target(**architecture.get("args", {}))
    except Exception as error:
        raise ModelError(f"Architecture {name!r} cannot be built with args {architecture.get('args')}: "
                         f"{error}") from None
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"Architecture {name!r} returned {type(network).__name__}, not a torch.nn.Module")
    return network


def load_state_dict_file(path) -> Dict[str, Any]:
    """Tensors only (``weights_only``), unwrapping ``{"state_dict": ...}``/``{"model": ...}`` and ``module.``."""
    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"Weights file {path} cannot be read as PyTorch weights (truncated or not a checkpoint): "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise ModelError(f"Weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


def apply_state_dict(network, state_dict: Dict[str, Any], path, architecture_name: str) -> None:
    """Load weights strictly; a mismatch raises ``ModelError`` listing a few of the differing keys."""
    expected = network.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                if key in state_dict and state_dict[key].shape != value.shape]
    if missing or unexpected or reshaped:
        details = "; ".join(f"{label}: {items[:3]}{' ...' if len(items) > 3 else ''}"
                            for label, items in (("missing", missing), ("unexpected", unexpected),
                                                 ("different shape", reshaped)) if items)
        raise ModelError(f"The weights in {path} do not match the architecture {architecture_name} ({details})")
    network.load_state_dict(state_dict, strict=True)


def load_network(card: ModelCard, device="cpu", cache_dir=None, progress: Optional[Progress] = None,
                 offline: bool = False, bundle_search_dirs: Optional[Iterable] = None):
    """The card's network with verified weights, on ``device`` and in eval mode (bundles: the bundle's network)."""
    progress = as_progress(progress)
    if card.is_bundle:
        bundle_dir = find_bundle_dir(card, cache_dir, bundle_search_dirs)
        _, network = load_bundle(bundle_dir, device=device, overrides=card)
        progress.report(1.0, f"{card.title} loaded")
        return network
    weights_path = resolve_weights(card, cache_dir, progress.sub(0.0, 0.9), offline)
    network = build_architecture(card.architecture)
    apply_state_dict(network, load_state_dict_file(weights_path), weights_path, card.architecture["name"])
    progress.report(1.0, f"{card.title} loaded")
    return network.to(device).eval()


def resolve_card(card: ModelCard, cache_dir=None, bundle_search_dirs: Optional[Iterable] = None) -> ModelCard:
    """A card with labels, spacing and intensity filled in: the card itself, or for a bundle entry, its bundle's."""
    if not card.is_bundle:
        return card
    return card_from_bundle(find_bundle_dir(card, cache_dir, bundle_search_dirs), overrides=card)


# ---------------------------------------------------------------------------------------------------------------------
# MONAI bundles


def default_bundle_search_dirs(cache_dir=None) -> List[Path]:
    """``<cache>/bundles`` and MONAI's own download folder (``python -m monai.bundle download`` puts them there)."""
    import torch

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [cache / "bundles", Path(torch.hub.get_dir()) / "bundle"]


def find_bundle_dir(card: ModelCard, cache_dir=None, search_dirs: Optional[Iterable] = None) -> Path:
    """The folder of a bundle entry: its ``bundle.dir``, else ``<search dir>/<bundle name>``."""
    name = card.bundle["name"]
    if card.bundle.get("dir"):
        folder = Path(card.bundle["dir"]).expanduser()
        if not folder.is_absolute() and card.base_dir is not None:
            folder = card.base_dir / folder
        if not (folder / "configs").is_dir():
            raise ModelError(f"MONAI bundle folder {folder} of model '{card.id}' has no configs/ folder")
        return folder
    searched = [Path(folder) / name for folder in
                (search_dirs if search_dirs is not None else default_bundle_search_dirs(cache_dir))]
    for folder in searched:
        if (folder / "configs").is_dir():
            return folder
    raise ModelError(f"MONAI bundle '{name}' (model '{card.id}') not found in {', '.join(map(str, searched))}. "
                     f"Download it, e.g. `python -m monai.bundle download {name} --bundle_dir "
                     f"{searched[0].parent}`, or set 'bundle.dir' to its folder in a user catalogue.")


def _bundle_parser(bundle_dir: Path):
    from monai.bundle import ConfigParser

    metadata = bundle_dir / "configs" / "metadata.json"
    if not metadata.is_file():
        raise ModelError(f"MONAI bundle {bundle_dir} has no configs/metadata.json")
    candidates = [bundle_dir / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
    config = next((path for path in candidates if path.is_file()), None)
    if config is None:
        raise ModelError(f"MONAI bundle {bundle_dir} has no configs/inference.json (nor inference.yaml)")
    if config.suffix != ".json" and importlib.util.find_spec("yaml") is None:
        raise ModelError(f"MONAI bundle {bundle_dir} has a YAML config ({config.name}); install PyYAML to read it")
    parser = ConfigParser()
    try:
        parser.read_meta(str(metadata))
        parser.read_config(str(config))
    except Exception as error:
        raise ModelError(f"MONAI bundle {bundle_dir}: cannot read its configs ({error})") from None
    parser["bundle_root"] = str(bundle_dir)
    return parser


def _parsed(parser, config_id: str, bundle_dir: Path):
    """Evaluate one config item; a package the bundle needs but is missing becomes a clear ``ModelError``."""
    try:
        return parser.get_parsed_content(config_id)
    except Exception as error:
        missing = _missing_package(error)
        if missing:
            raise ModelError(f"MONAI bundle {bundle_dir.name}: '{config_id}' needs the Python package '{missing}', "
                             f"which is not installed (pip install {missing}).") from None
        raise ModelError(f"MONAI bundle {bundle_dir.name}: cannot evaluate '{config_id}' in its inference config "
                         f"({_first_line(error)})") from None


def _missing_package(error: BaseException) -> Optional[str]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError):
            match = re.search(r"No module named '([^'.]+)", str(error))
            if match:
                return match.group(1)
            if getattr(error, "name", None):
                return error.name.split(".")[0]
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _preprocessing_transforms(parser) -> List[Tuple[int, str, Dict[str, Any]]]:
    """``(index, class name, raw config)`` of each transform in ``preprocessing``, the model zoo's convention."""
    preprocessing = parser.get("preprocessing")
    transforms = preprocessing.get("transforms", []) if isinstance(preprocessing, dict) else []
    return [(index, str(raw.get("_target_", "")).rsplit(".", 1)[-1], raw)
            for index, raw in enumerate(transforms) if isinstance(raw, dict)]


def _bundle_spacing(parser, bundle_dir) -> Optional[Tuple[float, float, float]]:
    # A disabled Spacingd still gives the model's spacing: the zoo disables it when the data was resampled beforehand.
    # After Orientationd('RAS') its axes are x, y, z, so pixdim is in ITK spacing order.
    for index, name, raw in _preprocessing_transforms(parser):
        if name == "Spacingd" and "pixdim" in raw:
            pixdim = _parsed(parser, f"preprocessing#transforms#{index}#pixdim", bundle_dir)
            values = list(pixdim) if isinstance(pixdim, (list, tuple)) else [pixdim] * 3
            return _spacing([float(v) for v in values], f"MONAI bundle {bundle_dir.name} (Spacingd pixdim)")
    return None


def _bundle_intensity(parser, bundle_dir) -> Optional[Dict[str, Any]]:
    enabled = []
    for index, name, raw in _preprocessing_transforms(parser):
        prefix = f"preprocessing#transforms#{index}"
        if "_disabled_" in raw and _parsed(parser, f"{prefix}#_disabled_", bundle_dir):
            continue
        enabled.append((prefix, name, raw))

    def value(prefix, raw, key, default):
        return _parsed(parser, f"{prefix}#{key}", bundle_dir) if key in raw else default

    names = [name for _, name, _ in enabled]
    for position, (prefix, name, raw) in enumerate(enabled):
        if name == "ScaleIntensityRanged":
            hu_min, hu_max = value(prefix, raw, "a_min", None), value(prefix, raw, "a_max", None)
            out_min, out_max = value(prefix, raw, "b_min", None), value(prefix, raw, "b_max", None)
            if out_min is None or out_max is None:
                out_min, out_max = hu_min, hu_max
            return {"type": "window", "hu_min": hu_min, "hu_max": hu_max, "out_min": out_min, "out_max": out_max,
                    "clip": bool(value(prefix, raw, "clip", False))}
        if name == "NormalizeIntensityd":
            if any(key in raw for key in ("subtrahend", "divisor")):
                break
            intensity = {"type": "zscore", "nonzero": bool(value(prefix, raw, "nonzero", False))}
            following = enabled[position + 1] if position + 1 < len(enabled) else None
            if following is not None and following[1] == "ScaleIntensityd":
                intensity.update(out_min=value(following[0], following[2], "minv", 0.0),
                                 out_max=value(following[0], following[2], "maxv", 1.0))
            return intensity
    raise ModelError(f"MONAI bundle {bundle_dir.name}: cannot derive the intensity preprocessing from its "
                     f"'preprocessing' transforms {names}; supported: ScaleIntensityRanged, NormalizeIntensityd "
                     "(optionally followed by ScaleIntensityd). Give 'intensity' in the catalogue entry.")


def _bundle_roi_size(parser, bundle_dir) -> Optional[Tuple[int, int, int]]:
    inferer = parser.get("inferer")
    if isinstance(inferer, dict) and "roi_size" in inferer:
        roi = _parsed(parser, "inferer#roi_size", bundle_dir)
    elif parser.get("infer_patch_size") is not None:
        roi = _parsed(parser, "infer_patch_size", bundle_dir)
    else:
        return None
    return _roi_size([int(v) for v in roi], f"MONAI bundle {bundle_dir.name} (inferer roi_size)")


def _bundle_task_and_labels(metadata: Dict[str, Any], bundle_dir: Path) -> Tuple[Optional[str], Dict[int, str]]:
    prediction = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    if prediction.get("format") == "segmentation":
        task = "segmentation"
    elif prediction.get("type") == "object":
        task = "detection"
    else:
        task = None
    channels = prediction.get("channel_def") or {}
    labels = {}
    for key, name in channels.items():
        if task == "segmentation" and str(key) == "0":
            continue  # the zoo's segmentation bundles use channel 0 for the background
        labels[str(key)] = str(name)
    return task, labels


def card_from_bundle(bundle_dir, overrides: Optional[ModelCard] = None) -> ModelCard:
    """A model card from a bundle's configs (no network built); fields set in ``overrides`` take precedence."""
    bundle_dir = Path(bundle_dir).resolve()
    parser = _bundle_parser(bundle_dir)
    metadata = parser.get("_meta_", {}) or {}
    task, labels = _bundle_task_and_labels(metadata, bundle_dir)
    given = overrides.to_dict() if overrides is not None else {}
    entry: Dict[str, Any] = {
        "id": bundle_dir.name,
        "title": metadata.get("name") or metadata.get("task") or bundle_dir.name,
        "task": task,
        "labels": labels,
        "spacing_mm": None if given.get("spacing_mm") else _bundle_spacing(parser, bundle_dir),
        "intensity": None if given.get("intensity") else _bundle_intensity(parser, bundle_dir),
        "roi_size": None if given.get("roi_size") else _bundle_roi_size(parser, bundle_dir),
        "licence": _bundle_licence(bundle_dir, metadata),
        "description": metadata.get("description", ""),
        "source": str(bundle_dir),
    }
    entry.update({key: value for key, value in given.items() if value not in (None, "", {}, [])})
    entry["bundle"] = {"name": (overrides.bundle["name"] if overrides is not None and overrides.is_bundle
                                else bundle_dir.name), "dir": str(bundle_dir)}
    if not entry["labels"]:
        raise ModelError(f"MONAI bundle {bundle_dir.name}: configs/metadata.json names no output classes "
                         "(network_data_format.outputs.pred.channel_def); give 'labels' in the catalogue entry")
    if entry["task"] is None:
        raise ModelError(f"MONAI bundle {bundle_dir.name}: configs/metadata.json does not say whether it segments "
                         "or detects (network_data_format.outputs.pred); give 'task' in the catalogue entry")
    return ModelCard.from_dict(entry, base_dir=bundle_dir, origin=f"MONAI bundle {bundle_dir}")


def _bundle_licence(bundle_dir: Path, metadata: Dict[str, Any]) -> str:
    if (bundle_dir / "LICENSE").is_file():
        return f"see {bundle_dir / 'LICENSE'}"
    return str(metadata.get("copyright") or "not stated by the bundle")


def load_bundle(bundle_dir, device="cpu", overrides: Optional[ModelCard] = None):
    """``(card, network)`` of a local MONAI bundle: ``network_def`` with ``models/model.pt``, or ``models/model.ts``."""
    import torch

    bundle_dir = Path(bundle_dir).resolve()
    card = card_from_bundle(bundle_dir, overrides)
    checkpoint = bundle_dir / "models" / "model.pt"
    torchscript = bundle_dir / "models" / "model.ts"
    if checkpoint.is_file():
        parser = _bundle_parser(bundle_dir)
        key = "network_def" if parser.get("network_def") is not None else "network"
        if parser.get(key) is None:
            raise ModelError(f"MONAI bundle {bundle_dir.name}: configs/inference has neither 'network_def' "
                             "nor 'network'")
        network = _parsed(parser, key, bundle_dir)
        if not isinstance(network, torch.nn.Module):
            raise ModelError(f"MONAI bundle {bundle_dir.name}: '{key}' is a {type(network).__name__}, "
                             "not a torch.nn.Module")
        apply_state_dict(network, load_state_dict_file(checkpoint), checkpoint, f"'{key}' of {bundle_dir.name}")
    elif torchscript.is_file():
        try:
            network = torch.jit.load(str(torchscript), map_location="cpu")
        except Exception as error:
            raise ModelError(f"TorchScript file {torchscript} cannot be loaded: {_first_line(error)}") from None
    else:
        raise ModelError(f"MONAI bundle {bundle_dir.name} has no weights: expected {checkpoint} or {torchscript}")
    return card, network.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Export as a MONAI bundle


BUNDLE_VERSION = "0.1.0"
BUNDLE_AUTHORS = "MedicalImageRecognition"


def export_bundle(card: ModelCard, bundle_dir, cache_dir=None) -> Path:
    """Write ``card`` with its verified weights as a MONAI bundle (model zoo layout) that ``load_bundle`` and
    ``card_from_bundle`` read back, and that ``python -m monai.bundle run`` runs for segmentation cards."""
    import torch

    if card.is_bundle or card.architecture is None or card.weights is None:
        raise ModelError(f"Model '{card.id}' is a MONAI bundle entry, not a network with weights; its bundle folder "
                         "is already the export")
    bundle_dir = Path(bundle_dir)
    preprocessing = _export_preprocessing(card)
    network = load_network(card, cache_dir=cache_dir)  # checks the SHA-256 and that the weights fit the architecture
    for folder in ("configs", "models", "docs"):
        (bundle_dir / folder).mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), bundle_dir / "models" / "model.pt")
    metadata = _export_metadata(card)
    inference = _export_inference(card, preprocessing)
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    (bundle_dir / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
    (bundle_dir / "LICENSE").write_text(f"{card.licence}\n\nModel '{card.id}' exported by {BUNDLE_AUTHORS}.\n")
    (bundle_dir / "docs" / "README.md").write_text(_export_readme(card))
    return bundle_dir


def _export_intensity_transforms(card: ModelCard) -> List[Dict[str, Any]]:
    """The intensity step as MONAI transforms, exactly those ``_bundle_intensity`` parses back."""
    intensity = card.intensity
    if intensity["type"] == "window":
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": intensity["hu_min"],
                 "a_max": intensity["hu_max"], "b_min": intensity["out_min"], "b_max": intensity["out_max"],
                 "clip": intensity["clip"]}]
    not_expressible = sorted(key for key in ("hu_min", "hu_max", "mean", "std") if key in intensity)
    if not_expressible:
        raise ModelError(f"Model '{card.id}': its z-score intensity with {not_expressible} cannot be written as "
                         "bundle transforms that read back the same (NormalizeIntensityd [+ ScaleIntensityd])")
    transforms = [{"_target_": "NormalizeIntensityd", "keys": "image",
                   "nonzero": bool(intensity.get("nonzero", False))}]
    if "out_min" in intensity:
        transforms.append({"_target_": "ScaleIntensityd", "keys": "image", "minv": intensity["out_min"],
                           "maxv": intensity["out_max"]})
    return transforms


def _export_preprocessing(card: ModelCard) -> Dict[str, Any]:
    transforms = [{"_target_": "LoadImaged", "keys": "image"},
                  {"_target_": "EnsureChannelFirstd", "keys": "image"},
                  {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
                   "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}]  # explicit: MONAI 1.6 warns on the default
    if card.spacing_mm is not None:  # after Orientationd('RAS') pixdim is x, y, z: ITK spacing order
        transforms.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing_mm),
                           "mode": "bilinear"})
    transforms += _export_intensity_transforms(card)
    transforms.append({"_target_": "EnsureTyped", "keys": "image"})
    return {"_target_": "Compose", "transforms": transforms}


def _export_channels(card: ModelCard) -> Dict[str, str]:
    channels = {"0": "background"} if card.task == "segmentation" else {}
    channels.update({str(value): name for value, name in sorted(card.labels.items())})
    return channels


def _export_metadata(card: ModelCard) -> Dict[str, Any]:
    import numpy
    import monai
    import torch

    channels = _export_channels(card)
    image = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1, "dtype": "float32",
             "is_patch_data": card.roi_size is not None, "channel_def": {"0": "image"}}
    if card.task == "segmentation":
        out_channels = card.architecture["args"].get("out_channels", max(card.labels) + 1)
        prediction = {"type": "image", "format": "segmentation", "num_channels": out_channels, "dtype": "float32",
                      "value_range": [0, 1], "is_patch_data": card.roi_size is not None, "channel_def": channels}
    else:
        prediction = {"type": "object", "format": "dict", "num_channels": len(channels), "channel_def": channels}
    if card.roi_size is not None:
        image["spatial_shape"] = list(card.roi_size)
        if card.task == "segmentation":
            prediction["spatial_shape"] = list(card.roi_size)
    labels = ", ".join(card.labels.values())
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from the MedicalImageRecognition model card '{card.id}'"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {},
        "name": card.title,
        "task": f"CT {card.task}: {labels}",
        "description": card.description or card.title,
        "authors": BUNDLE_AUTHORS,
        "copyright": f"Copyright (c) {BUNDLE_AUTHORS}; licence: {card.licence}",
        "license": card.licence,
        "intended_use": "Research only, not for diagnostic use",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": prediction}},
    }


def _export_inference(card: ModelCard, preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": card.architecture["name"], **card.architecture.get("args", {})},
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing,
    }
    if card.task == "detection":  # boxes need this project's detector around the network: no runnable evaluator
        if card.roi_size is not None:
            config["infer_patch_size"] = list(card.roi_size)
        return config
    config.update({"imports": ["$import glob"], "output_dir": "$@bundle_root + '/eval'",
                   "dataset_dir": "$@bundle_root + '/data'",
                   "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))"})
    if card.roi_size is not None:
        config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": list(card.roi_size),
                             "sw_batch_size": 1, "overlap": 0.25}
    else:
        config["inferer"] = {"_target_": "SimpleInferer"}
    config.update({
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False}]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "run": ["$@evaluator.run()"],
    })
    return config


def _export_readme(card: ModelCard) -> str:
    labels = ", ".join(f"{value} = {name}" for value, name in sorted(card.labels.items()))
    spacing = list(card.spacing_mm) if card.spacing_mm else "the input image's own"
    lines = [f"# {card.title}", "",
             f"MONAI bundle exported by {BUNDLE_AUTHORS} from its model card `{card.id}` ({card.task} in CT).", "",
             card.description, "",
             f"- Labels: {labels}" + (" (0 is the background)" if card.task == "segmentation" else ""),
             f"- Spacing (mm, x y z): {spacing}",
             f"- Intensity: {json.dumps(card.intensity)}",
             f"- ROI size (voxels): {list(card.roi_size) if card.roi_size else 'whole image'}",
             f"- Architecture: `{card.architecture['name']}`; weights: `models/model.pt` (state dict)",
             f"- Licence: {card.licence}",
             f"- Source: {card.source or 'not stated'}", "",
             "## Training", "", "```json", json.dumps(card.training or {}, indent=2), "```", "",
             "## Metrics", "", "```json", json.dumps(card.metrics or {}, indent=2), "```", "",
             "Research only, not for diagnostic use."]
    if card.task == "segmentation":
        lines += ["", "Run: `python -m monai.bundle run --config_file configs/inference.json "
                      "--bundle_root . --dataset_dir <folder of .nii.gz>` (needs pytorch-ignite)."]
    return "\n".join(lines) + "\n"
