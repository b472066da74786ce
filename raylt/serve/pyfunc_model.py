"""MLflow "model from code" entry point: logged as the model's code, so no pickle is involved."""

import mlflow

from raylt.serve.pyfunc import HeadModel

mlflow.models.set_model(HeadModel())
