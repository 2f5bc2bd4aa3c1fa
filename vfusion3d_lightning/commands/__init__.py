"""User-facing operations: one module per command, each one typed function that the CLI and the pipeline call.

Nothing in the package imports this layer except the CLI."""
