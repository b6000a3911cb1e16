"""Reproducible miniatures of the papers' claims (issue 7): `python -m experiments.study`.

See experiments/README.md.
"""
