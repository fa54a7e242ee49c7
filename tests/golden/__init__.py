"""Parity vectors made from the official VAR / VIAR / FlexVAR code (``python -m tests.golden.make``, see
docs/parity.md): small models whose weights are redrawn here from seeds (``tests.golden.weights``), and what the
official code computes with them (``tests.golden.vectors`` reads them)."""
