"""car-kit: the sf-dl-car-classification competition kit."""

__version__ = "0.2.0"
