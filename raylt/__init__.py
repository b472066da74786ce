"""raylt: long-tail image classification on frozen CLIP embeddings, with Ray and MLflow.

The packages, in pipeline order (raylt/pipeline.py calls them in this order):

    data/         sources of {id, label, split, path or image}
    embed/        decode, frozen encoder, the embedding store, embedding sets
    latent/       per-class statistics, calibrated Gaussians, the synthetic stream
    methods/      selection, the BNS adapter, auxiliary classes, which are on
    head/         head modules and losses, its rows, the training loop, Ray Train, head.npz, evaluation
    tracking/     MLflow runs and the output folder's record
    serve/        the logged model, batch prediction
    experiments/  ablation, tune, report
    config/ ops/  the config schema and loader; Ray, trainer harness, locks, hashes
    testing/      generated embeddings for tests and benchmarks
"""

__version__ = "0.1.0"
