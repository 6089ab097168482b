"""covseg: weakly-supervised COVID-19 lesion segmentation for chest CT, as a reproducible pipeline."""

__version__ = "0.1.0"
