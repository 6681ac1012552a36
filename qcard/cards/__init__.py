"""Quantization cards: schema (card.json v1), rendering, comparison."""
from .schema import CARD_SCHEMA_VERSION, Card, load_card  # noqa: F401
