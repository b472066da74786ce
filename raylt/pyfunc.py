"""Where models logged by raylt 0.1.0 find their class: their `pyfunc_model.py` imports
`raylt.pyfunc.HeadModel`, which now lives in raylt.serve.pyfunc. Loading such a model in a
process that has already imported raylt resolves that import here."""

from raylt.serve.pyfunc import HeadModel, log_model  # noqa: F401
