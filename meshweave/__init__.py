"""meshweave: distributed training of transformer language models over one device mesh."""

__version__ = "0.1.0"
