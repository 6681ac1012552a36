"""The static gallery of cards (`qcard site`): qcard.site.build writes it, qcard.site.rows makes its rows."""
from .build import build_site

__all__ = ["build_site"]
