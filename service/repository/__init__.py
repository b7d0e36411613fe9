"""The model repository: Triton's layout, config parsing and versions."""
