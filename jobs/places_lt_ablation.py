"""places_lt_ablation: every long-tail method on the Places-LT embeddings, side by side, as MLflow
child runs of one parent run (raylt.experiments.ablation).

    ray job submit --working-dir . -- python jobs/places_lt_ablation.py \
        data.root=/shared/places365 data.split_dir=/shared/places_lt \
        store.root=/shared/raylt/store train.output_dir=/shared/raylt/outputs \
        tracking.uri=sqlite:////shared/raylt/mlflow.db \
        auxiliary.embeddings=/shared/raylt/auxiliary auxiliary.class_names=/shared/raylt/auxiliary/classnames.txt

The embedding store of the first `places_lt.py` run is reused. Without `auxiliary.embeddings`
(a second labelled embedding corpus, same backbone) the auxiliary-classes recipe is skipped.
"""

import sys

from raylt.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "configs/places_lt.yaml", *sys.argv[1:]]))
