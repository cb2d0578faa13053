"""LoFiT itself: its options (:mod:`.config`), the per-head intervention
(:mod:`.intervention`), the adapted model (:mod:`.model`), its files (:mod:`.adapter_io`),
merging into the base weights (:mod:`.merge`), the head ranking (:mod:`.ranking`) and its
localization figures (:mod:`.localization`), the two steps (:mod:`.steps`), the head
selectors (:mod:`.selectors`) and the method that runs them (:mod:`.method`).

Kept free of imports so that importing one of its modules loads only what that module needs."""
