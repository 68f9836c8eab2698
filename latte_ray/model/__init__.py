"""Model construction and loading for latte-ray."""
