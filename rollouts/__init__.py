"""Record action-conditioned rollouts to disk, read them back, and feed them to the world model."""
