"""lorafuse's version: what markers, adapter metadata and `lorafuse --version` report (pyproject.toml's too)."""

__version__ = "0.1.0"
