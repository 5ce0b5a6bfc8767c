"""What happens to one slide: read, find tissue, tile, infer, stitch, export."""
