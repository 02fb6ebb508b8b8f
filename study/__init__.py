"""Does CASS help at small scale? The study (python -m study.run) and its real image sets (study.sets)."""
