"""The jet experiment: one module per stage (``python -m pipeline.<stage>``), configs in ``conf/``."""
