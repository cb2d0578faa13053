"""One run of the command line: its configuration and pipeline (:mod:`.pipeline`), the
comparison of methods (:mod:`.comparison`), option presets (:mod:`.recipes`) and the
figures a run writes (:mod:`.plots`). Imports every layer below it."""
