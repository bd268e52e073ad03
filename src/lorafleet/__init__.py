"""lorafleet: one frozen base model, a fleet of small low-rank adapters."""
__version__ = "0.1.0"
