"""Readers of inputs that are not a Hugging Face checkpoint directory (Meta's original layout: ``meta``), or not
local (a hub repository: ``hub``, ``hub_diff``), each giving the same tensor table."""
