"""Checkpoint converters into the InternVL-X bundle format (see README, "Converting checkpoints")."""
