"""latte-ray."""
