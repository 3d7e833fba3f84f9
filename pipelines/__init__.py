"""memzoo jobs: data, training, extrapolation, evaluation, export, benchmarks and the CLI."""
