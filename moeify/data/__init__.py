"""Text for training, calibration, evaluation and router statistics: loading, chat rendering, packing, and the
built-in corpus."""
