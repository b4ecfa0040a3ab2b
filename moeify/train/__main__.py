"""`python -m moeify.train RECIPE.yaml [KEY=VALUE ...]`: the same as `moeify train`, for launchers such as
`accelerate launch [accelerate args] -m moeify.train RECIPE.yaml`."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
