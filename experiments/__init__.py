"""Reproducible miniatures of the papers' claims: `python -m experiments.study`.

See experiments/README.md.
"""
