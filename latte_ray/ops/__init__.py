"""Operations on an output: status and reports, read from the manifest alone."""
