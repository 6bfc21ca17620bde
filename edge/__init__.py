"""The edge node: capture cameras, check their health, encode usable views, publish.

Runs without torch: a Jetson node carries an exported engine, not a training stack.
"""
