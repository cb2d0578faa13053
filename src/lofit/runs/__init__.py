"""One run of the command line: its configuration and the one conversion of flat options
(:mod:`.config`), its data (:mod:`.data`), its folder, the one writer of its files
(:mod:`.folder`), the pipeline behind each command (:mod:`.pipeline`), the comparison of
methods (:mod:`.comparison`), option presets (:mod:`.recipes`) and the figures a run writes
(:mod:`.plots`). Imports every layer below it."""
