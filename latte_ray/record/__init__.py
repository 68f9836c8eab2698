"""The record of a run under its output prefix: storage, layout, atomic writes, the manifest and its compaction, and the output's own records (its binding to one spec, one record per run)."""
