"""Outpost device agent: reconciles a device towards its signed desired state and serves models."""

__version__ = "0.1.0"
