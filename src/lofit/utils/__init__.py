"""The lowest layer: helpers that know nothing of models or data. Atomic file writes
(:mod:`.atomic`), several processes (:mod:`.distributed`), where computation runs
(:mod:`.compute`) and dataclass fields as command-line options (:mod:`.options`).
Imports nothing else from lofit."""
