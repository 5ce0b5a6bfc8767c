"""Stages applied to one slide: read, find tissue, tile, infer, stitch, export."""
