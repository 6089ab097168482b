"""The code file of the registered `covseg` model (MLflow *models from code*).

MLflow runs this file to build the model when it is loaded (``mlflow.pyfunc.load_model``,
``mlflow models serve``); the weights come from the model's artifacts. Nothing is unpickled.
"""

from mlflow.models import set_model

from covseg.serving import CovsegModel

set_model(CovsegModel())
