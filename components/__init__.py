"""KFP v2 components of the covseg training pipeline: one thin binding of `covseg.stages.<name>` per file.

Only the standard library and `kfp.dsl` are imported at module level, so compiling the pipeline needs
neither torch nor the covseg runtime stack; each component imports what it needs inside its body.
"""
