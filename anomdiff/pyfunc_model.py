"""The MLflow pyfunc model, defined from code (MLflow's models-from-code): this file is logged as the
model's code and the exported model folder (``model.safetensors`` + ``config.json``) as its one
artifact, so the logged model holds no pickled Python object.

Input: a DataFrame with an ``image`` column (base64-encoded image files, PNG or JPEG, any size and
mode) and an optional ``category`` column; parameter ``return_map`` (default false). Output: one row
per image with ``score``, ``decision`` (``score >= threshold``, the threshold chosen on validation)
and, when asked, ``anomaly_map`` (rows of floats at the image's size). A ``category`` column is
needed only by a category-aware model.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import set_model
from PIL import Image

INPUT_COLUMNS = ("image", "category")
BATCH = 16  # images per forward pass: a large request does not go to the device at once


def decode_base64_image(text: str) -> np.ndarray:
    """A base64-encoded image file as H x W x 3 uint8 (grayscale, RGBA and 16-bit converted)."""
    from anomdiff.data.images import BadSampleError, load_rgb

    if not isinstance(text, str):
        raise ValueError(f"image: a base64 string is needed, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image: not base64 ({exc})") from None
    try:
        return np.asarray(load_rgb(io.BytesIO(data)))
    except BadSampleError as exc:
        raise ValueError(f"image: {exc.reason}") from None


def encode_base64_png(rgb: np.ndarray) -> str:
    """H x W x 3 uint8 as a base64 PNG (what clients send)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class AnomalyDetector(mlflow.pyfunc.PythonModel):
    """Scores base64 images with the exported model in the ``model`` artifact."""

    def load_context(self, context) -> None:
        import torch

        from anomdiff.inference import ImageScorer

        self.scorer = ImageScorer(context.artifacts["model"], device="cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params)
        except ValueError as exc:  # the request's fault: a served model answers 400 with this message
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(exc)) from None

    def _predict(self, model_input: pd.DataFrame, params: dict | None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise ValueError(f"the input needs an 'image' column of base64 images; got {got}")
        return_map = bool((params or {}).get("return_map", False))
        categories = (model_input["category"] if "category" in model_input.columns
                      else pd.Series([None] * len(model_input)))
        rows = []
        # Images of one category are scored together, BATCH at a time.
        for category, group in model_input.groupby(categories.fillna("").to_numpy(), sort=False):
            images = [decode_base64_image(text) for text in group["image"]]
            predictions = [p for start in range(0, len(images), BATCH)
                           for p in self.scorer.score(images[start:start + BATCH], category or None)]
            for position, prediction in zip(group.index, predictions, strict=True):
                row = {"position": position, "score": prediction.score, "decision": prediction.decision}
                if return_map:
                    row["anomaly_map"] = prediction.anomaly_map.astype(np.float32).tolist()
                rows.append(row)
        return pd.DataFrame(rows).set_index("position").loc[model_input.index].reset_index(drop=True)


set_model(AnomalyDetector())
