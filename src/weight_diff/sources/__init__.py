"""Readers of inputs that are not a Hugging Face checkpoint directory, each giving the same tensor table."""
