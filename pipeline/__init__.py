"""The jet experiment: one module per stage (``python -m pipeline.<stage>``), configs in ``conf/``."""

import logging

# Hydra logs at INFO, which would print what libraries report at that level as if it mattered: JAX's
# "Unable to initialize backend 'tpu'" on every machine without one, orbax's note on every saved
# checkpoint. Their warnings and errors still show.
for _library in ("jax._src.xla_bridge", "absl"):
    logging.getLogger(_library).setLevel(logging.WARNING)
