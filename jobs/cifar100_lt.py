"""cifar100_lt: the whole pipeline (embed, class statistics, sampler, Ray Train head, evaluation, MLflow).

    ray job submit --working-dir . -- python jobs/cifar100_lt.py \
        data.root=/shared/cifar data.imbalance_ratio=100 \
        store.root=/shared/raylt/store train.output_dir=/shared/raylt/outputs \
        tracking.uri=sqlite:////shared/raylt/mlflow.db

Paths must be absolute on shared storage (README, "On a Ray cluster"); more overrides may follow.
"""

import sys

from raylt.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "configs/cifar100_lt.yaml", *sys.argv[1:]]))
