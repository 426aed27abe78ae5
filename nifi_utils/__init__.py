"""nifi_utils: the shared, tested code of the NiFi lab, one subpackage per layer, bottom to top:
core (paths, errors, shared facts, workers, launch) · measure (image metrics, statistics) · gs (Gaussian scenes,
cameras, rendering, procedural and real scenes) · codec (rate levels, the `.nifi` container) · models (autoencoder,
prior, restorer, distillation, regression baseline, NiFi-3D) · eval (baselines, benchmark, plots, viewer) ·
pipeline (params, the stage runner, the notebooks' input guard, the command line).
A module imports only from its own layer or the ones below (tests/test_layers.py); docs/design.md draws the map."""
