"""`python -m glm_jax.cli ...` is `glm-jax ...`."""
import sys

from glm_jax.cli.main import main

sys.exit(main())
