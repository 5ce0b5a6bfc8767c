"""Test suite of bcseg-wsi.

A regular package, so that ``tests.<module>`` imports find these files before any installed
distribution that ships its own top-level ``tests`` package (torchstain does).
"""
