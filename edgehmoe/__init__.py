"""edgehmoe: hierarchical mixture of small experts for federated learning on Raspberry Pi-class devices."""
__version__ = "0.1.0"

