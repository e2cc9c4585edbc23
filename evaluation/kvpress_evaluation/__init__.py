"""kvpress evaluation: benchmarks, metrics and the command-line interface (installed as ``kvpress_evaluation``)."""
