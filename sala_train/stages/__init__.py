"""Training stages: each builds the trainer for its kind of data and loss."""
