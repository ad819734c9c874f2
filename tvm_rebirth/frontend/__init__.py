"""Stage 1, the model: zoo, ONNX import into Relax (layer names attached), datasets."""
