"""Looking at models: `verify` (is the MoE the dense model at step 0), `info`, router statistics, parameter counts
and the model card."""
