"""Stage 3, the weights: calibration images, least-squares fitting, fine-tune, weights files."""
