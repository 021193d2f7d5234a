"""The MLflow pyfunc of a registered flowers export (models from code: MLflow runs this file).

    model = mlflow.pyfunc.load_model("models:/<experiment>/<version>")
    probabilities = model.predict(images)   # (N, S, S, 3) RGB 0..255 -> (N, classes) float32

The images are what `flowers predict` feeds the model: RGB, values 0..255 (uint8 or float), already
decoded and resized to the export's input side S (flowers.images.load_image_files does both). The
model is the export's model.keras, run by flowers' .keras opener under $KERAS_BACKEND (tensorflow
when unset; the backend keras already uses when it is imported). The flowers package travels with
the model (MLflow's code_paths), so the loading environment needs its packages, not a flowers install.
"""

from __future__ import annotations

import os
import sys

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class FlowersClassifier(PythonModel):
    def load_context(self, context):
        if "keras" not in sys.modules:
            from flowers import backend

            backend.select(os.environ.get("KERAS_BACKEND", "tensorflow"))
        from flowers.export import runtimes

        self.model = runtimes.open_model(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        images = np.asarray(model_input, dtype=np.float32)
        side = self.model.image_size
        if images.ndim == 3:
            images = images[np.newaxis]
        if images.ndim != 4 or images.shape[1:] != (side, side, 3):
            raise ValueError(f"expected RGB images of shape (N, {side}, {side}, 3), values 0..255; "
                             f"got shape {images.shape}")
        return self.model.predict(images)


mlflow.models.set_model(FlowersClassifier())
