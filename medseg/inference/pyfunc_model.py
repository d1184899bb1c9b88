"""The ``python_function`` flavour of a medseg model package: ``mlflow.pyfunc.load_model`` predicts with it.

The flavour names this module as its loader (``loader_module``), with no ``data`` entry: MLflow calls
``_load_pyfunc(<the model folder>)``, which loads the package with ``load_package`` and builds a ``Predictor``. So
nothing is pickled (the folder keeps only weights-only tensors and text) and the ``medseg`` flavour, the files
and ``models:/`` loading stay as they are; ``add_pyfunc_flavour`` only rewrites ``MLmodel`` and adds MLflow's
signature, input example and environment files beside the package's own.

``MedsegPyfunc.predict`` takes a NIfTI path (str), a list of paths (one scan each), or a float array
``(C, X, Y, Z)`` (read with 1 mm isotropic voxels and an identity affine: an array carries no geometry), and
returns the label map (uint8, uint16 from 256 classes, in the input's voxel grid) or a list of them. The signature
declares one string column (paths) and a label tensor: through ``mlflow.pyfunc.load_model(...).predict`` MLflow
enforces it, turning a path or a list of paths into a one-column DataFrame (one row: one label map, more: a list);
arrays go through ``load_model(...).get_raw_model().predict(array)``. A served model reads paths on its own machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import medseg
from medseg.errors import InputError
from medseg.inference.model_package import MLMODEL, load_package
from medseg.inference.predictor import Predictor
from medseg.io.atomic import write_text_atomic

EXAMPLE_PATH = "/data/scan.nii.gz"  # the input example: a NIfTI path on the machine that runs the model
_MLFLOW_FILES = (
    "input_example.json",
    "serving_input_example.json",
    "requirements.txt",
    "python_env.yaml",
    "conda.yaml",
)


class MedsegPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns the predictions of: one package's ``Predictor``."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def get_raw_model(self) -> MedsegPyfunc:
        """What ``PyFuncModel.get_raw_model`` returns: this object, whose ``predict`` also takes arrays."""
        return self

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Label map(s) of a path, a list of paths, a ``(C, X, Y, Z)`` array or a one-column DataFrame of paths."""
        if hasattr(model_input, "columns"):  # a DataFrame (MLflow's schema enforcement makes one of paths)
            paths = [str(v) for v in model_input.iloc[:, 0]]
            return self._one(paths[0]) if len(paths) == 1 else [self._one(p) for p in paths]
        if isinstance(model_input, (str, Path)):
            return self._one(model_input)
        if isinstance(model_input, np.ndarray):
            return self._one(model_input)
        if isinstance(model_input, (list, tuple)):
            return [self._one(item) for item in model_input]
        raise InputError(
            "model input",
            f"expected a NIfTI path, a list of paths or a (C, X, Y, Z) array, not {type(model_input).__name__}",
        )

    def _one(self, item: Any) -> np.ndarray:
        if isinstance(item, np.ndarray):
            if item.ndim != 4:
                raise InputError("model input", f"array of shape {item.shape}: expected (C, X, Y, Z)")
            data = item[0] if item.shape[0] == 1 else np.moveaxis(item, 0, -1)  # channels last, as NIfTI holds them
            image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.eye(4))
            return self.predictor.predict(image, name="array").labels
        path = Path(str(item))
        if not path.is_file():
            raise InputError(path, "no such NIfTI file")
        return self.predictor.predict([path]).labels


def _load_pyfunc(data_path: str) -> MedsegPyfunc:
    """MLflow's loader-module entry point: the package folder -> a predicting model (``device: auto``)."""
    return MedsegPyfunc(Predictor(load_package(data_path), device="auto"))


def add_pyfunc_flavour(package_dir: str | Path) -> Path:
    """Add the ``python_function`` flavour, a signature and an input example to the package's ``MLmodel``."""
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    pkg = Path(package_dir)
    package = load_package(pkg)
    mlmodel = Model.load(str(pkg / MLMODEL))  # the ``medseg`` flavour written by save_package
    label_dtype = np.dtype(np.uint8 if package.num_classes < 256 else np.uint16)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # paths: an array has no geometry, a served model reads no arrays
        outputs=Schema([TensorSpec(label_dtype, (-1, -1, -1))]),
    )
    example = [EXAMPLE_PATH]
    with tempfile.TemporaryDirectory(prefix="medseg_pyfunc_") as tmp:
        out = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(out),
            loader_module=__name__,
            mlflow_model=mlmodel,
            signature=signature,
            input_example=example,
            pip_requirements=[f"medseg=={medseg.__version__}"],  # given: inferring them would load the model
        )
        for name in (*_MLFLOW_FILES, MLMODEL):
            if (out / name).is_file():
                write_text_atomic(pkg / name, (out / name).read_text())
    return pkg
