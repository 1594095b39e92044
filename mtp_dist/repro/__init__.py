"""Reproductions of the paper's small-scale findings, one command each (`mtp repro NAME`).

polynomials.py and stories.py generate the synthetic tasks (and score answers exactly);
study.py runs variants x seeds, summarises them and judges the paper's claims; studies.py
defines the studies. Results: docs/reproductions.md.
"""
