"""Per-domain steps of `make demo`: each module has `run(ctx: DemoContext) -> None`, run in name order."""
