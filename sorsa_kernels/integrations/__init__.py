"""Integrations with the trainers people already use (``transformers``, ``peft``)."""
