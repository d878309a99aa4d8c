"""Core: schemes, config, errors, site records and meta keys, target profiles, the fake-quant arithmetic.

Imports nothing else of qtrim_fx; every later stage may import it.
"""
