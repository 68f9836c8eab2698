"""Datasets built from outputs: synthetic prompt recipes and WebDataset export."""
