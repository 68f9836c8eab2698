"""The record of a run under its output prefix: storage, layout, atomic writes, the manifest and its compaction."""
