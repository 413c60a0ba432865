"""The candidate classifier: a random forest stored as plain JSON arrays and evaluated with numpy.

scikit-learn fits the forest (``train_forest``, a training-time dependency only); its trees are then written as JSON
(no pickle: portable, safe to load, readable by Slicer's Python without scikit-learn) and evaluated here with numpy.
The evaluation reproduces ``RandomForestClassifier.predict_proba`` bit for bit: like scikit-learn it compares the
features as float32 (``x <= threshold``), and each stored threshold is the largest float32 not above scikit-learn's
float64 one, which gives the same decision for every float32 input and a short decimal in the file.

File layout (``format`` = ``FORMAT_NAME``, ``format_version`` = ``FORMAT_VERSION``)::

    {"format": ..., "format_version": 1, "positive_class": "nodule", "feature_names": [...],
     "metadata": {"description": ..., "training": {...}, "metrics": {...}},
     "trees": [{"feature": [...], "threshold": [...], "left": [...], "right": [...], "value": [...]}, ...]}

Per tree, node 0 is the root; a split node sends a row to ``left`` when ``x[feature] <= threshold``, else to
``right``; a leaf has ``feature``, ``left`` and ``right`` -1 and ``value`` = its probability of "nodule" (``value`` is 0
at split nodes, ``threshold`` 0 at leaves). The forest's probability is the mean over its trees.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from RecognitionCore.errors import InputError, ModelError

from .features import FEATURE_NAMES

FORMAT_NAME = "mir-random-forest"
FORMAT_VERSION = 1
POSITIVE_CLASS = "nodule"
_LEAF = -1
_TREE_KEYS = ("feature", "threshold", "left", "right", "value")


class _Tree:
    """One decision tree as arrays, checked once so that evaluation cannot index out of range or loop."""

    def __init__(self, feature, threshold, left, right, value, n_features: int):
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64).astype(np.float32)
        self.left = np.asarray(left, dtype=np.int64)
        self.right = np.asarray(right, dtype=np.int64)
        self.value = np.asarray(value, dtype=np.float64)
        self._check(n_features)
        self.depth = self._depth()

    def _check(self, n_features: int) -> None:
        arrays = (self.feature, self.threshold, self.left, self.right, self.value)
        n_nodes = len(self.feature)
        if n_nodes == 0 or any(array.shape != (n_nodes,) for array in arrays):
            raise ValueError(f"its arrays must be non-empty lists of one length, got lengths "
                             f"{[array.size for array in arrays]}")
        leaf = self.feature == _LEAF
        nodes = np.arange(n_nodes)
        split = ~leaf
        if np.any(self.feature[split] < 0) or np.any(self.feature[split] >= n_features):
            raise ValueError(f"a split uses a feature index outside 0..{n_features - 1}")
        if np.any(self.left[leaf] != _LEAF) or np.any(self.right[leaf] != _LEAF):
            raise ValueError("a leaf has children")
        for children in (self.left[split], self.right[split]):  # children after their parent: no cycles
            if np.any(children <= nodes[split]) or np.any(children >= n_nodes):
                raise ValueError("a split node's children are not later nodes of the tree")
        if not np.all(np.isfinite(self.threshold)):
            raise ValueError("a threshold is not a finite float32")
        if not np.all((self.value[leaf] >= 0.0) & (self.value[leaf] <= 1.0)):
            raise ValueError("a leaf probability is outside 0..1")

    def _depth(self) -> int:
        depth = np.zeros(len(self.feature), dtype=np.int64)
        for node in np.flatnonzero(self.feature != _LEAF):  # parents come before their children
            depth[self.left[node]] = depth[self.right[node]] = depth[node] + 1
        return int(depth.max())

    def leaf_probability(self, rows: np.ndarray) -> np.ndarray:
        """Probability of the leaf each float32 row reaches (all rows descend one level per step)."""
        node = np.zeros(len(rows), dtype=np.int64)
        row_index = np.arange(len(rows))
        for _ in range(self.depth):
            feature = self.feature[node]
            goes_left = rows[row_index, np.maximum(feature, 0)] <= self.threshold[node]
            child = np.where(goes_left, self.left[node], self.right[node])
            node = np.where(feature == _LEAF, node, child)
        return self.value[node]

    def to_dict(self) -> Dict[str, list]:
        return {
            "feature": self.feature.tolist(),
            "threshold": [_short_float32(value) for value in self.threshold],
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "value": self.value.tolist(),
        }


class ForestModel:
    """A trained random forest: ``predict_proba(X)`` gives each candidate's probability of being a nodule."""

    def __init__(self, trees: Sequence[_Tree], feature_names: Sequence[str], metadata: Optional[Mapping] = None):
        if not trees:
            raise ModelError("a forest model needs at least one tree")
        self.trees = list(trees)
        self.feature_names = tuple(feature_names)
        self.metadata: Dict[str, Any] = dict(metadata or {})

    @property
    def n_trees(self) -> int:
        return len(self.trees)

    @classmethod
    def from_json(cls, source: Union[str, Path, Mapping],
                  feature_names: Optional[Sequence[str]] = FEATURE_NAMES) -> "ForestModel":
        """Load a forest from a JSON file (or its already parsed dict). It must use ``feature_names`` in this order
        (by default the detector's ``FEATURE_NAMES``; ``None`` accepts any)."""
        from_file = isinstance(source, (str, Path))
        document = _read_json(Path(source)) if from_file else source
        where = f"forest model {source}" if from_file else "the forest model"
        if not isinstance(document, Mapping) or document.get("format") != FORMAT_NAME:
            found = document.get("format") if isinstance(document, Mapping) else type(document).__name__
            raise ModelError(f"{where} is not a {FORMAT_NAME!r} file (format {found!r})")
        if document.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{where} has format version {document.get('format_version')!r}; this version of the "
                             f"extension reads version {FORMAT_VERSION}: retrain it or update the extension")
        names = document.get("feature_names")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ModelError(f"{where} has no list of feature names")
        if feature_names is not None and tuple(names) != tuple(feature_names):
            raise ModelError(f"{where} was trained on other features than this version computes: "
                             f"{_describe_difference(names, feature_names)}; retrain it")
        trees = document.get("trees")
        if not isinstance(trees, list) or not trees:
            raise ModelError(f"{where} holds no trees")
        parsed = []
        for index, tree in enumerate(trees):
            try:
                parsed.append(_Tree(*(tree[key] for key in _TREE_KEYS), n_features=len(names)))
            except (KeyError, TypeError, ValueError) as error:
                raise ModelError(f"{where}: tree {index} is malformed ({error})") from error
        metadata = document.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise ModelError(f"{where} has metadata that is not a JSON object")
        return cls(parsed, names, metadata)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "positive_class": POSITIVE_CLASS,
            "feature_names": list(self.feature_names),
            "metadata": self.metadata,
            "trees": [tree.to_dict() for tree in self.trees],
        }

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write the model: header indented, one tree per line (readable, and small)."""
        path = Path(path)
        document = self.to_dict()
        trees = document.pop("trees")
        header = json.dumps(document, indent=2)
        tree_lines = ",\n".join("    " + json.dumps(tree, separators=(",", ":")) for tree in trees)
        path.write_text(header[:-2] + ',\n  "trees": [\n' + tree_lines + "\n  ]\n}\n", encoding="utf-8")
        return path

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of "nodule" (float64, shape (n,)) for rows of features in ``feature_names`` order;
        a single row may be given as a 1-D array."""
        rows = _checked_features(features, self.feature_names).astype(np.float32)
        total = np.zeros(len(rows), dtype=np.float64)
        for tree in self.trees:  # summed in tree order, then divided, as scikit-learn does
            total += tree.leaf_probability(rows)
        return total / self.n_trees


def forest_from_sklearn(forest, feature_names: Sequence[str], metadata: Optional[Mapping] = None) -> ForestModel:
    """Convert a fitted binary ``sklearn.ensemble.RandomForestClassifier`` (class 1 = nodule)."""
    classes = [int(label) for label in forest.classes_]
    if classes != [0, 1] or getattr(forest, "n_outputs_", 1) != 1:
        raise ModelError(f"only a single-output forest with classes [0, 1] can be converted, got classes {classes}")
    if forest.n_features_in_ != len(feature_names):
        raise ModelError(f"the forest uses {forest.n_features_in_} features, {len(feature_names)} names were given")
    trees = []
    for estimator in forest.estimators_:
        fitted = estimator.tree_
        value = fitted.value[:, 0, :]
        totals = value.sum(axis=1)
        if not np.allclose(totals, 1.0):  # scikit-learn < 1.4 stored weighted counts and normalised when predicting
            value = value / np.where(totals == 0, 1.0, totals)[:, None]
        leaf = fitted.children_left == _LEAF
        trees.append(_Tree(
            feature=np.where(leaf, _LEAF, fitted.feature),
            threshold=np.where(leaf, 0.0, _float32_at_or_below(fitted.threshold)),
            left=fitted.children_left,
            right=fitted.children_right,
            value=np.where(leaf, value[:, 1], 0.0),
            n_features=len(feature_names),
        ))
    return ForestModel(trees, feature_names, metadata)


def train_forest(features: np.ndarray, labels: Sequence, feature_names: Sequence[str] = FEATURE_NAMES,
                 n_trees: int = 100, max_depth: int = 8, seed: int = 0, *, min_samples_leaf: int = 2,
                 class_weight: Optional[str] = "balanced", description: str = "") -> ForestModel:
    """Fit a random forest on candidate features (rows) and labels (1 nodule, 0 not) with scikit-learn.

    ``class_weight="balanced"`` because candidates are mostly false positives. The metadata records the training
    set, the parameters, scikit-learn's version and the out-of-bag accuracy and AUC (``metrics``)."""
    rows = _checked_features(features, feature_names)
    targets = _checked_labels(labels, len(rows))
    try:
        import sklearn
        from sklearn.ensemble import RandomForestClassifier
    except ImportError as error:
        raise ModelError("training the nodule classifier needs scikit-learn (pip install scikit-learn); "
                         "using a trained model does not") from error
    forest = RandomForestClassifier(n_estimators=n_trees, max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                    class_weight=class_weight, oob_score=True, random_state=seed)
    with warnings.catch_warnings():  # few trees leave some rows without out-of-bag votes; they are skipped below
        warnings.simplefilter("ignore", UserWarning)
        forest.fit(rows, targets)
    metadata = {
        "description": description,
        "training": {
            "library": f"scikit-learn {sklearn.__version__}",
            "n_samples": int(len(targets)),
            "n_positive": int(targets.sum()),
            "n_trees": n_trees, "max_depth": max_depth, "min_samples_leaf": min_samples_leaf,
            "class_weight": class_weight, "seed": seed,
        },
        "metrics": _out_of_bag_metrics(forest.oob_decision_function_, targets),
    }
    return forest_from_sklearn(forest, feature_names, metadata)


def roc_auc(scores: Sequence[float], labels: Sequence) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN when one class is absent."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels).astype(bool)
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


def _out_of_bag_metrics(decision: np.ndarray, targets: np.ndarray) -> Dict[str, float]:
    voted = np.all(np.isfinite(decision), axis=1) & (decision.sum(axis=1) > 0)
    probability = decision[voted, 1]
    truth = targets[voted]
    metrics = {"oob_samples": int(voted.sum())}
    if voted.any():
        metrics["oob_accuracy"] = float(np.mean((probability > 0.5) == truth))
        auc = roc_auc(probability, truth)
        if np.isfinite(auc):
            metrics["oob_auc"] = auc
    return metrics


def _checked_features(features, feature_names: Sequence[str]) -> np.ndarray:
    try:
        rows = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"candidate features must be numbers: {error}") from error
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[1] != len(feature_names):
        raise InputError(f"candidate features must have {len(feature_names)} columns ({', '.join(feature_names)}), "
                         f"got shape {np.shape(features)}")
    bad = ~np.isfinite(rows)
    if bad.any():
        columns = sorted({feature_names[column] for column in np.flatnonzero(bad.any(axis=0))})
        raise InputError(f"{int(bad.sum())} candidate feature values are NaN or infinite (in {', '.join(columns)})")
    return rows


def _checked_labels(labels, n_rows: int) -> np.ndarray:
    targets = np.asarray(labels)
    if targets.shape != (n_rows,):
        raise InputError(f"expected {n_rows} labels (one per row of features), got shape {targets.shape}")
    if not np.all(np.isin(targets, (0, 1))):
        raise InputError(f"labels must be 0 (not a nodule) or 1 (nodule), got values {np.unique(targets)[:10]}")
    targets = targets.astype(np.int64)
    if targets.min() == targets.max():
        raise InputError(f"training needs nodules and non-nodules; all {n_rows} labels are {int(targets[0])}")
    return targets


def _float32_at_or_below(thresholds: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold: for float32 x, x <= t exactly when x <= this value."""
    rounded = np.asarray(thresholds, dtype=np.float64).astype(np.float32)
    above = rounded.astype(np.float64) > thresholds
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


def _short_float32(value: np.float32) -> float:
    """A float whose JSON text is short and that reads back (float64, then float32) as exactly ``value``."""
    short = float(str(np.float32(value)))
    return short if np.float32(short) == value else float(value)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"forest model file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"forest model {path} is not valid JSON (corrupt or truncated?): {error}") from error


def _describe_difference(found: List[str], expected: Sequence[str]) -> str:
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unknown {', '.join(extra)}")
    return "; ".join(parts) or "same features in another order"
