"""Long-running Kafka daemons: one module per worker, `python -m stream_workers <worker>`."""
