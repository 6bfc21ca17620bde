"""Training of the autoencoder, the score model and the downstream classifier."""
