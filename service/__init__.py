"""vae-anomaly scoring service and the model bundle contract (no torch here)."""

__version__ = "0.1.0"
