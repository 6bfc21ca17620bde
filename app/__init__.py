"""MVLD: multi-camera edge streaming with diffusion imputation of missing views.

The stages live in their own packages and data flows one way through them:
``mvld.edge`` (capture, health, encode, publish) -> ``mvld.common`` (the wire
contract both sides share) -> ``mvld.receiver`` (assemble, impute, decode,
downstream tasks). ``mvld.train`` and ``mvld.export`` produce the models.
"""

__version__ = "0.1.0"
