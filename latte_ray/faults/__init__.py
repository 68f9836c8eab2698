"""Faults: retries of transient storage failures, the crash ledger for poison rows, and fault injection for tests."""
