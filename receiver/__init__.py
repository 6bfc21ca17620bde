"""The receiver: authenticate, decode, assemble by node, impute missing views, run tasks."""
