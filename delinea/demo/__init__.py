"""The CPU demo: MedDelinea's protocol on the bundled real CT and MR, with small shipped backbones.

``python -m delinea.demo`` (``make demo``) runs it; :mod:`delinea.demo.protocol` fixes its data and measures its
backbones; ``configs/`` and ``weights/`` are installed with the package. Nothing in the library imports this.
"""
