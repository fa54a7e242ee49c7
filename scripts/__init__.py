"""Command-line tools beside the main scripts, each a module run from the repository root:
``python -m scripts.bench``, ``python -m scripts.fixed_point``, ``python -m scripts.sweep`` (``--help`` for each)."""
