"""The quality classifier: an SVM on averaged DINO features of a generated video, P(good) per video.

Persisted with skops (a safe format: loading checks every type against the ones this model is made of and
never runs code from the file), never with pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import accuracy_score, precision_score, recall_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from vfusion3d_lightning.io import atomic_write

FORMAT = "vfusion3d-quality-svm/1"


class QualitySVM:
    """Standardised features -> RBF SVM with balanced class weights and Platt-scaled probabilities; C is chosen
    by stratified cross-validation on balanced accuracy. features (N, D), labels (N,) with 1 = good."""

    def __init__(self, c_values: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), kernel: str = "rbf",
                 folds: int = 5, seed: int = 0):
        self.c_values, self.kernel, self.folds, self.seed = tuple(c_values), kernel, folds, seed
        self.pipeline: Pipeline | None = None
        self.info: dict[str, Any] = {}

    def fit(self, features: np.ndarray, labels: np.ndarray, feature_tag: str = "") -> "QualitySVM":
        features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(int)
        counts = np.bincount(labels, minlength=2)
        if features.ndim != 2 or len(features) != len(labels):
            raise ValueError(f"need features (N, D) and N labels, got {features.shape} and {labels.shape}")
        if set(np.unique(labels)) - {0, 1} or counts.min() < 2:
            raise ValueError(f"need labels 0 (bad) and 1 (good) with at least 2 of each, got counts {counts.tolist()}")
        folds = int(min(self.folds, counts.min()))
        svc = SVC(kernel=self.kernel, class_weight="balanced", random_state=self.seed)
        search = GridSearchCV(Pipeline([("scale", StandardScaler()), ("svm", svc)]), {"svm__C": list(self.c_values)},
                              scoring="balanced_accuracy",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed))
        search.fit(features, labels)
        # Platt-scaled probabilities from cross-validated decision values, then one SVM on all the data
        calibrated = CalibratedClassifierCV(clone(svc).set_params(C=search.best_params_["svm__C"]), method="sigmoid",
                                            ensemble=False,
                                            cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed))
        self.pipeline = Pipeline([("scale", StandardScaler()), ("svm", calibrated)]).fit(features, labels)
        self.info = {"format": FORMAT, "feature_tag": feature_tag, "feature_dim": int(features.shape[1]),
                     "C": float(search.best_params_["svm__C"]), "cv_balanced_accuracy": float(search.best_score_),
                     "train_counts": counts.tolist()}
        return self

    def _fitted(self) -> Pipeline:
        if self.pipeline is None:
            raise RuntimeError("the quality SVM is not trained: call fit() or QualitySVM.load(path)")
        return self.pipeline

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> P(good) (N,)."""
        features = np.asarray(features, dtype=np.float64)
        expected = self.info.get("feature_dim")
        if features.ndim != 2 or (expected is not None and features.shape[1] != expected):
            raise ValueError(f"the quality SVM takes features (N, {expected}), got {features.shape}; encode the "
                             f"videos with the feature model it was trained on ({self.info.get('feature_tag')})")
        pipeline = self._fitted()
        good = list(pipeline.classes_).index(1)
        return pipeline.predict_proba(features)[:, good]

    def evaluate(self, features: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
        """Accuracy, precision and recall of 'good' at `threshold` on labelled videos."""
        predicted = (self.score(features) >= threshold).astype(int)
        labels = np.asarray(labels).astype(int)
        return {"accuracy": float(accuracy_score(labels, predicted)),
                "precision": float(precision_score(labels, predicted, zero_division=0)),
                "recall": float(recall_score(labels, predicted, zero_division=0)), "count": int(len(labels))}

    def save(self, path: str | Path) -> Path:
        import skops.io

        return atomic_write(path, lambda tmp: skops.io.dump(self._state(), tmp))

    def dumps(self) -> bytes:
        import skops.io

        return skops.io.dumps(self._state())

    def _state(self) -> dict[str, Any]:
        return {"pipeline": self._fitted(), "info": self.info,
                "settings": {"c_values": list(self.c_values), "kernel": self.kernel, "folds": self.folds,
                             "seed": self.seed}}

    @classmethod
    def load(cls, path: str | Path) -> "QualitySVM":
        import skops.io

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quality SVM file {path} does not exist; train one with "
                                    "vfusion3d-lightning fit --config configs/curation/quality.yaml")
        untrusted = cls._untrusted_types(lambda: skops.io.get_untrusted_types(file=path), str(path))
        return cls._from_state(lambda: skops.io.load(path, trusted=untrusted), untrusted, str(path))

    @classmethod
    def loads(cls, data: bytes) -> "QualitySVM":
        import skops.io

        untrusted = cls._untrusted_types(lambda: skops.io.get_untrusted_types(data=data), "checkpoint data")
        return cls._from_state(lambda: skops.io.loads(data, trusted=untrusted), untrusted, "checkpoint data")

    @staticmethod
    def _untrusted_types(read, source: str) -> list[str]:
        import zipfile

        try:
            return read()
        except (zipfile.BadZipFile, KeyError, ValueError) as err:  # not a skops zip: a pickle, weights, a cut file
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save (a skops file: "
                             f"{type(err).__name__}: {err}); pickles are refused, as loading one runs code from it. "
                             "Train one with vfusion3d-lightning fit --config configs/curation/quality.yaml") from err

    @classmethod
    def _from_state(cls, load, untrusted: list[str], source: str) -> "QualitySVM":
        # trust only what an sklearn pipeline is made of; anything else could run code when built
        unexpected = [name for name in untrusted if not name.startswith(("sklearn.", "numpy."))]
        if unexpected:
            raise ValueError(f"{source} holds types a quality SVM is not made of: {unexpected}; refusing to load it")
        state = load()
        if not isinstance(state, dict) or state.get("info", {}).get("format") != FORMAT:
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save ({FORMAT})")
        model = cls(**{k: tuple(v) if k == "c_values" else v for k, v in state["settings"].items()})
        model.pipeline, model.info = state["pipeline"], state["info"]
        return model
