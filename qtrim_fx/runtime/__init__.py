"""Runtime: what a prepared model runs each step — sites, blend-quant, observers and their quantile
kernels, graph helper ops — and the prepared-model contract (:mod:`.prepared`)."""
