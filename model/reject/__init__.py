"""The reject-sampling loop and the run folder it writes (images, manifest, contact sheet)."""
