"""Errors a user causes at the command line (below every verb, so no verb imports the CLI)."""


class UsageError(ValueError):
    """Bad command-line input."""
