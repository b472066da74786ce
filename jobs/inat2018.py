"""inat2018: the whole pipeline (embed, class statistics, sampler, Ray Train head, evaluation, MLflow).

    ray job submit --working-dir . -- python jobs/inat2018.py \
        data.root=/shared/inat2018 data.split_dir=/shared/inat2018 \
        store.root=/shared/raylt/store train.output_dir=/shared/raylt/outputs \
        tracking.uri=sqlite:////shared/raylt/mlflow.db

Paths must be absolute on shared storage (README, "On a Ray cluster"); more overrides may follow.
"""

import sys

from raylt.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "configs/inat2018.yaml", *sys.argv[1:]]))
