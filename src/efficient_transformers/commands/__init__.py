"""Subcommands of the `efficient-transformers` command line."""
