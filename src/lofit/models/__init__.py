"""Base models: where each architecture keeps its attention heads (:mod:`.architectures`),
loading a model (:mod:`.loading`), a model's identity (:mod:`.identity`), the hub
(:mod:`.hub`) and the hooked model every method builds on (:mod:`.wrapper`,
``InterventionModel``). Imports only :mod:`lofit.utils`."""
