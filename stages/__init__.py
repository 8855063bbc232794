"""The pipeline's DVC stages, one module each (`python -m stages.<name>`), and what they share."""
