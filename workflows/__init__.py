"""Runs over many slides. Each slide goes through ``pipeline.run.run_slide``."""
