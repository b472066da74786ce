"""The seed methods beside the default recipe: IP-DPP selection (selection.py), the BNS adapter
(bns.py, bns_ray.py, bns_artifact.py), auxiliary classes (auxiliary.py), and which are on in a
config (recipes.py)."""
