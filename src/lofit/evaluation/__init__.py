"""Scoring a model: log-probabilities of completions (:mod:`.scoring`), greedy generation
(:mod:`.generation`) and multiple-choice scoring (:mod:`.multiple_choice`). Imports
:mod:`lofit.utils`, :mod:`lofit.data` and :mod:`lofit.models`."""
