"""thinkforge: train, evaluate and serve reasoning models."""
__version__ = "0.1.0"
