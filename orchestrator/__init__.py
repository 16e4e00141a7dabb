"""vlcl's orchestration: configs, the Ray Train task loop, evaluation, metrics, MLflow, sweeps, CLI."""
