"""A tiny models-from-code file for the registry tests: one conv layer, masks out.

MLflow runs this file when it loads the model; the weights come from the ``weights`` artifact (safetensors).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model


class TinyNet(torch.nn.Module):
    """1-channel conv: logits map the size of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TinySegmenter(mlflow.pyfunc.PythonModel):
    """CT slices (N,1,H,W float32) in, binary masks (N,1,H,W float32) out."""

    def load_context(self, context):  # noqa: ANN001
        from safetensors.torch import load_model

        self.net = TinyNet()
        load_model(self.net, context.artifacts["weights"])
        self.net.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        with torch.no_grad():
            prob = torch.sigmoid(self.net(torch.as_tensor(np.asarray(model_input, dtype=np.float32))))
        return (prob > 0.5).float().numpy()


set_model(TinySegmenter())
