"""Data: the example types every task produces (:mod:`.examples`), reading and checking data
files (:mod:`.files`), tokenizing and batching (:mod:`.batching`) and packing answer
choices into rows (:mod:`.choice_packing`). Imports only :mod:`lofit.utils`."""
