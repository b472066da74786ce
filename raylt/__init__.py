"""raylt: long-tail image classification on frozen CLIP embeddings, with Ray and MLflow."""

__version__ = "0.1.0"
