"""Training stage: curriculum (λ_t), reverse pruner, the QuantTrim driver, calibration, checkpoints,
and framework integrations (Lightning)."""
