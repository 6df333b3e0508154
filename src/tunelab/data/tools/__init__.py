"""`tunelab data` tools: check, convert, dedup, split and stats over any supported format.

Each tool streams its input (records are read one at a time; only small per-record
summaries such as hashes, signatures or lengths stay in memory) and writes its outputs
atomically, so an interrupted run never leaves a half-written file.
"""
