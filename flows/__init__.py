"""Batch flows: one module per job. `python -m flows` serves every deployment in prefect.yaml."""
