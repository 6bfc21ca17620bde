"""Simulation for machines without cameras (folder ``sim/``, installed as ``mvld.sim``).

The tabletop rig (``rig``, pybullet's TinyRenderer), the ``sim://`` camera source, the camera
faults the health benchmark and tests inject (``faults``) and the demo's faulty camera
(``demo_source``). Runtime code imports it only through the ``sim://`` source scheme.
"""
