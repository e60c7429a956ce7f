"""spice-ray: SPICE data selection and fine-tuning on Ray."""
__version__ = "0.1.0"
