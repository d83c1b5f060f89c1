"""Model runtimes: how a verified package's model is loaded and called."""
