"""What every stage leans on: starting Ray, the shared TorchTrainer harness, optimisers, locks, hashes."""
