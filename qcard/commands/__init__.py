"""Subcommands that live in their own modules, loaded by the CLI only when called."""
