"""Planning before any model loads: prompt tables, ids and seeds, 128-bit keys, the work plan, dry runs."""
