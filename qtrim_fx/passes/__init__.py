"""FX passes, by stage: :mod:`.prepare` (capture -> prepared model) and :mod:`.lower` (prepared -> deployable).

Every pass follows :mod:`.base` (``requires`` -> ``call`` -> ``ensures``, truthful ``modified``).
"""
