"""delinea: MedDelinea medical image segmentation with a Control DiT over a frozen latent DiT."""

__version__ = "0.1.0"
