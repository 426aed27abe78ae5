"""nifi_utils: the shared, tested code of the NiFi lab (see DESIGN.md for the layers).

1 core (common, gaussians, cameras) · 2 render · 3 scenes · 4 codec · 5 models · 6 evaluation ·
7 pipeline (params, run, cli). A module imports only from layers below it.
"""
__version__ = "0.1.0"
