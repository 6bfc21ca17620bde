"""The torch model definitions (folder ``model/``, installed as ``mvld.model``).

Autoencoder, score network, SDE, the downstream classifier's network and the self-describing
checkpoint files. The receiver, training and export import them; the edge never does (it runs
the exported encoder), and ``mvld.common`` stays free of torch.
"""
