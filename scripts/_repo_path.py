"""Imported first by the scripts that also run as files (``python scripts/X.py``, where Python puts ``scripts/`` on
the path): puts the repository root in front, so that ``models`` and ``utils`` are this repository's."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
