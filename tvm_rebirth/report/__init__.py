"""Stage 7, the report: side-by-side measurements, time per layer type, plots, output files."""
