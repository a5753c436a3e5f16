"""Renderers turn a `Report` into text or JSON-ready dicts. They never print; the CLI does."""
