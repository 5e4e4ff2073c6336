"""unlearn-toolkit."""
