"""Serving: the logged MLflow model (pyfunc.py), the one model loader (model.py) and batch
prediction (predict.py)."""
