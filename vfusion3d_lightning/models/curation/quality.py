"""The quality classifier: an SVM on averaged DINO features of a generated video, P(good) per video.

Persisted with skops (a safe format: loading checks every type against the ones this model is made of and
never runs code from the file), never with pickle: `save_pretrained` / `from_pretrained`, as every model here.
"""

from __future__ import annotations

import json
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

from vfusion3d_lightning import hub
from vfusion3d_lightning.io import atomic_write_folder

FORMAT = "vfusion3d-quality-svm/1"
WEIGHTS_NAME, CONFIG_NAME, README_NAME = "model.skops", "config.json", "README.md"
CHECKPOINT_KEY = "quality_svm"  # QualityModule's checkpoints hold the fitted SVM's skops bytes under this key
FIT_CONFIG = "configs/curation/quality.yaml"
EXPECTED_SOURCES = (f"a folder QualitySVM.save_pretrained wrote, a Lightning .ckpt of QualityModule or a registry "
                    f"name; train one with vfusion3d-lightning fit --config {FIT_CONFIG}")


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
            raise RuntimeError("the quality SVM is not trained: call fit() or QualitySVM.from_pretrained(path)")
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

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.skops` (the fitted pipeline, settings and training record, in skops' safe format),
        `config.json` (the settings and record, to read) and a `README.md` model card into `directory`,
        replacing an earlier save only once every new file is written (`io.atomic_write_folder`).

        Args:
            directory: the folder; created if absent.
        """
        data = self._to_bytes()
        config = json.dumps({"format": FORMAT, "settings": self._settings(), "info": self.info}, indent=2)
        held_out = self.info.get("held_out")
        card = hub.model_card(
            "VFusion3D video quality SVM",
            f"VFusion3D's curation classifier: an SVM ({self.kernel} kernel, C={self.info.get('C')}) on averaged "
            f"DINO features of 8 frames of a generated orbit video -> P(good). "
            f"Features: {self.info.get('feature_tag') or 'unrecorded'} "
            f"({self.info.get('feature_dim')} dimensions); trained on {self.info.get('train_counts')} (bad, good) "
            f"videos{f'; held-out {held_out}' if held_out else ''}.",
            "from vfusion3d_lightning.models.curation.quality import QualitySVM\n\n"
            "svm = QualitySVM.from_pretrained(FOLDER)\np_good = svm.score(features)  # (N, D) -> (N,)",
            {CONFIG_NAME: "the settings and training record (read only; model.skops holds them too)",
             WEIGHTS_NAME: "the fitted scikit-learn pipeline (skops: loading checks every type, never unpickles)"})

        def write(tmp: Path) -> None:
            (tmp / WEIGHTS_NAME).write_bytes(data)
            (tmp / CONFIG_NAME).write_text(config)
            (tmp / README_NAME).write_text(card)

        return atomic_write_folder(directory, write, last=(WEIGHTS_NAME,))

    @classmethod
    def from_pretrained(cls, source: str | Path, checkpoint_dir: str | Path | None = None) -> "QualitySVM":
        """Load a trained SVM.

        Args:
            source: a `save_pretrained` folder (or the model.skops in it), a registry name (converter
                `quality_svm`), or a Lightning `.ckpt` of `QualityModule`.
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
        """
        _, path = hub.locate_weights(source, checkpoint_dir, what="quality SVM", expected=EXPECTED_SOURCES,
                                     converters=("quality_svm",))
        if hub.is_lightning_checkpoint(path):
            checkpoint = hub.read_lightning_checkpoint(path, "QualityModule",
                                                       ("c_values", "kernel", "folds", "threshold"), prefix=None,
                                                       fit_config=FIT_CONFIG)
            data = checkpoint.raw.get(CHECKPOINT_KEY)
            if not isinstance(data, bytes):
                raise ValueError(f"{path} holds no fitted quality SVM (saved before its training step); give a later "
                                 f"checkpoint or the folder the run exported")
            return cls._from_bytes(data, str(path))
        if path.is_dir():
            if not (path / WEIGHTS_NAME).is_file():
                raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}: not a folder QualitySVM.save_pretrained wrote; "
                                        f"give {EXPECTED_SOURCES}")
            path = path / WEIGHTS_NAME
        return cls._from_bytes(path.read_bytes(), str(path))

    def _settings(self) -> dict[str, Any]:
        return {"c_values": list(self.c_values), "kernel": self.kernel, "folds": self.folds, "seed": self.seed}

    def _to_bytes(self) -> bytes:
        """The skops bytes of the fitted SVM: what save_pretrained writes and QualityModule's checkpoints hold."""
        import skops.io

        return skops.io.dumps({"pipeline": self._fitted(), "info": self.info, "settings": self._settings()})

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> "QualitySVM":
        """The SVM in skops bytes (`_to_bytes`), loading only the sklearn and numpy types it is made of."""
        import zipfile

        import skops.io

        try:
            untrusted = skops.io.get_untrusted_types(data=data)
        except (zipfile.BadZipFile, KeyError, ValueError) as err:  # not a skops zip: a pickle, weights, a cut file
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save_pretrained (a skops file: "
                             f"{type(err).__name__}: {err}); pickles are refused, as loading one runs code from it. "
                             f"Give {EXPECTED_SOURCES}") from err
        # trust only what an sklearn pipeline is made of; anything else could run code when built
        unexpected = [name for name in untrusted if not name.startswith(("sklearn.", "numpy."))]
        if unexpected:
            raise ValueError(f"{source} holds types a quality SVM is not made of: {unexpected}; refusing to load it")
        state = skops.io.loads(data, trusted=untrusted)
        if not isinstance(state, dict) or state.get("info", {}).get("format") != FORMAT:
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save_pretrained ({FORMAT})")
        model = cls(**{k: tuple(v) if k == "c_values" else v for k, v in state["settings"].items()})
        model.pipeline, model.info = state["pipeline"], state["info"]
        return model
