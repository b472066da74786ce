"""Run the demo pipeline on a `ray.cluster_utils.Cluster` of N nodes on this machine and write
its metrics and the nodes each stage ran on as JSON (tests/test_cluster.py runs it in its own
process, since the test session already holds a Ray).

    python tests/cluster_run.py NODES CPUS_PER_NODE OUT_JSON key=value ...
"""

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from raylt.config import load_config
from raylt.pipeline import run

REPO = Path(__file__).resolve().parents[1]

# What each stage's Ray work is called in the state API.
STAGES = {
    "embed": ("actor", lambda a: a.class_name.startswith("MapWorker") and "encode" in a.class_name.lower()),
    "stats": ("task", lambda t: t.name == "_files_moments"),
    "train": ("actor", lambda a: a.class_name == "RayTrainWorker"),
}


def main(nodes: int, cpus: int, out: str, overrides: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": True,
                                                            "object_store_memory": 150 * 1024**2})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=150 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load_config(REPO / "configs/demo.yaml", overrides)
    (result,) = run(cfg)
    actors, tasks = list_actors(detail=True, limit=10_000), list_tasks(detail=True, limit=10_000)
    used = {}
    for stage, (kind, match) in STAGES.items():
        items = actors if kind == "actor" else tasks
        # Records never placed on a node (a task cancelled before it was scheduled) carry no node id.
        used[stage] = sorted({i.node_id for i in items if match(i) and i.node_id})
    Path(out).write_text(json.dumps({
        "metrics": {k: result.metrics[k] for k in ("overall", "many", "medium", "few", "per_class")},
        "nodes": [n["NodeID"] for n in ray.nodes()], "used": used,
        "names": sorted({a.class_name for a in actors}),
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
