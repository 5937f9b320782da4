"""ControlNet on SD2.1 for colourisation: model, colour conditioning, checkpoints, training."""
