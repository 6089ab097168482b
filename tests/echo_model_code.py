"""A models-from-code file whose model echoes its input: stands in for the segmenter where tests only read
the registry (MLflow runs this file when it logs or loads the model)."""

import mlflow.pyfunc
from mlflow.models import set_model


class Echo(mlflow.pyfunc.PythonModel):
    """Returns its input."""

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        return model_input


set_model(Echo())
