"""The quality classifier: an SVM on averaged DINO features of a generated video, P(good) per video.

Persisted with skops, never with pickle: `save_pretrained` / `from_pretrained`, as every model here. A skops file
names the type of every object in it; loading refuses a file that names any type (or function) outside
`SKOPS_NODES`, exactly what a genuine file holds, before skops builds anything, because sklearn and numpy
objects are enough to run code: a Pipeline of FunctionTransformers over numpy functions calls them on the
features.
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
_CALLABLE_NODES = ("FunctionNode", "MethodNode", "PartialNode", "OperatorFuncNode")
EXPECTED_SOURCES = (f"a folder QualitySVM.save_pretrained wrote, a Lightning .ckpt of QualityModule or a registry "
                    f"name or a Hugging Face Hub repo id push_to_hub wrote; train one with vfusion3d-lightning fit "
                    f"--config {FIT_CONFIG}")
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME)
# (skops node kind, type) of every object in a genuine file: the fitted pipeline of `fit` with its info and
# settings. Exact names, no prefixes: any other sklearn estimator or numpy function may run code when the pipeline
# is built or used. tests/test_security.py checks that a freshly fitted SVM's file holds exactly these, so a
# scikit-learn or skops upgrade that changes them fails there rather than refusing users' files.
SKOPS_NODES = frozenset({
    ("DictNode", "builtins.dict"),
    ("JsonNode", "builtins.str"),  # every JSON value (str, int, float, bool, None), read back with json.loads
    ("ListNode", "builtins.list"),
    ("TupleNode", "builtins.tuple"),
    ("TypeNode", "builtins.str"),  # the key type of dicts
    ("NdArrayNode", "numpy.ndarray"),  # read with allow_pickle=False
    ("NdArrayNode", "numpy.float64"),
    ("ObjectNode", "sklearn.pipeline.Pipeline"),
    ("ObjectNode", "sklearn.preprocessing._data.StandardScaler"),
    ("ObjectNode", "sklearn.calibration.CalibratedClassifierCV"),
    ("ObjectNode", "sklearn.calibration._CalibratedClassifier"),
    ("ObjectNode", "sklearn.calibration._SigmoidCalibration"),
    ("ObjectNode", "sklearn.svm._classes.SVC"),
    ("ObjectNode", "sklearn.model_selection._split.StratifiedKFold"),
})


def skops_nodes(data: bytes) -> set[tuple[str, str]]:
    """(node kind, "module.name") of every object a skops file names, read from its schema.json without building
    anything. Raises zipfile.BadZipFile, KeyError or ValueError for bytes that are no skops file."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if len(names) != len(set(names)):  # two members of one name: which one a reader takes is not certain
            raise ValueError("the archive holds two members of one name")
        schema = json.loads(archive.read("schema.json"))
    found, todo = set(), [schema]
    while todo:  # every dict holding __class__ and __module__ is a node skops builds (or a reference to one)
        item = todo.pop()
        if isinstance(item, dict):
            kind, module, name = item.get("__loader__"), item.get("__module__"), item.get("__class__")
            if module is not None or name is not None:
                found.add((str(kind), f"{module}.{name}"))
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


class QualitySVM(hub.PushToHubMixin):
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

    def save_pretrained(self, directory: str | Path, card_data: dict | None = None) -> Path:
        """Write `model.skops` (the fitted pipeline, settings and training record, in skops' safe format),
        `config.json` (the settings and record, to read) and a `README.md` model card into `directory`,
        replacing an earlier save only once every new file is written (`io.atomic_write_folder`).
        `push_to_hub(repo_id)` uploads the same files.

        Args:
            directory: the folder; created if absent.
            card_data: what the model card records (`hub.model_card`); its metrics default to the training
                record's (cross-validated balanced accuracy, held-out scores where recorded).
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
             WEIGHTS_NAME: "the fitted scikit-learn pipeline (skops: loading checks every type, never unpickles)"},
            pipeline_tag="tabular-classification", tags=("curation", "scikit-learn", "skops"),
            card_data={"metrics": self._recorded_metrics(), **(card_data or {})})

        def write(tmp: Path) -> None:
            (tmp / WEIGHTS_NAME).write_bytes(data)
            (tmp / CONFIG_NAME).write_text(config)
            (tmp / README_NAME).write_text(card)

        return atomic_write_folder(directory, write, last=(WEIGHTS_NAME,))

    @classmethod
    def from_pretrained(cls, source: str | Path, checkpoint_dir: str | Path | None = None, *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None) -> "QualitySVM":
        """Load a trained SVM.

        Args:
            source: a `save_pretrained` folder (or the model.skops in it), a Hugging Face Hub repo id (`org/name`,
                as push_to_hub wrote it), a registry name (converter `quality_svm`), or a Lightning `.ckpt` of
                `QualityModule`.
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
            revision, cache_dir, token: for a Hub repo id (see `LRM.from_pretrained`).
        """
        _, path = hub.locate_weights(source, checkpoint_dir, what="quality SVM", expected=EXPECTED_SOURCES,
                                     converters=("quality_svm",), hub_files=HUB_FILES, revision=revision,
                                     cache_dir=cache_dir, token=token)
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

    def _recorded_metrics(self) -> dict[str, Any]:
        """The training record's scores, for the model card."""
        metrics = {}
        if self.info.get("cv_balanced_accuracy") is not None:
            metrics["cross-validated balanced accuracy (training set)"] = round(self.info["cv_balanced_accuracy"], 4)
        held_out = self.info.get("held_out")
        if isinstance(held_out, dict):
            metrics.update({f"held-out {k}": v for k, v in held_out.items()})
        return metrics

    def _settings(self) -> dict[str, Any]:
        return {"c_values": list(self.c_values), "kernel": self.kernel, "folds": self.folds, "seed": self.seed}

    def _to_bytes(self) -> bytes:
        """The skops bytes of the fitted SVM: what save_pretrained writes and QualityModule's checkpoints hold."""
        import skops.io

        return skops.io.dumps({"pipeline": self._fitted(), "info": self.info, "settings": self._settings()})

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> "QualitySVM":
        """The SVM in skops bytes (`_to_bytes`), refused unless every object in them is one `SKOPS_NODES` names."""
        import zipfile

        import skops.io

        try:
            nodes = skops_nodes(data)
        except (zipfile.BadZipFile, KeyError, ValueError, RecursionError) as err:  # a pickle, weights, a cut file
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save_pretrained (a skops file: "
                             f"{type(err).__name__}: {err}); pickles are refused, as loading one runs code from it. "
                             f"Give {EXPECTED_SOURCES}") from err
        allowed_types = {name for _, name in SKOPS_NODES}
        # a known type in another kind of node (a FunctionNode naming builtins.str) is named with its kind
        unexpected = sorted(name if name not in allowed_types else f"{name} as {kind}"
                            for kind, name in nodes - SKOPS_NODES)
        if unexpected:
            functions = sorted(name for kind, name in nodes - SKOPS_NODES if kind in _CALLABLE_NODES)
            raise ValueError(
                f"{source} holds types a quality SVM is not made of: {unexpected}; refusing to load it, as building "
                f"or using them could run code"
                f"{f' (it names functions, {functions}, which a quality SVM never holds)' if functions else ''}. "
                f"Only load quality SVMs you trained, or from people you trust: give {EXPECTED_SOURCES}")
        # every type is one a genuine file holds: trust exactly those (skops still audits the tree itself)
        try:
            state = skops.io.loads(data, trusted=sorted({name for _, name in nodes}))
        except Exception as err:  # only allowed types, so a malformed state (attributes missing or of other types)
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save_pretrained: skops cannot "
                             f"build it ({type(err).__name__}: {err}); give {EXPECTED_SOURCES}") from err
        info = state.get("info") if isinstance(state, dict) else None
        settings = state.get("settings") if isinstance(state, dict) else None
        if (not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(settings, dict)
                or not set(settings) <= {"c_values", "kernel", "folds", "seed"}
                or not isinstance(state.get("pipeline"), Pipeline)):
            raise ValueError(f"{source} is not a quality SVM written by QualitySVM.save_pretrained ({FORMAT}); give "
                             f"{EXPECTED_SOURCES}")
        model = cls(**{k: tuple(v) if k == "c_values" else v for k, v in settings.items()})
        model.pipeline, model.info = state["pipeline"], state["info"]
        return model
