"""weight-diff: publish a fine-tune as tuned - raw, recover it as raw + diff, streaming and checked."""

__version__ = "0.4.4"
