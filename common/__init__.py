"""Contracts shared by the edge and the receiver: wire protocol, errors, keys.

Nothing here imports torch at module level; the edge imports from this package.
"""
