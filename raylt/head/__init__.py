"""The head: modules and losses (modules.py), its real rows (rows.py), the epoch core (loop.py),
the Ray Train stage (fit_ray.py), the `head.npz` artifact (artifact.py) and evaluation
(evaluate.py)."""
