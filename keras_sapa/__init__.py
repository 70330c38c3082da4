"""keras_sapa."""
