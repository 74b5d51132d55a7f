"""``python -m ppl_vae.cli``: the ``ppl-vae`` command."""

import sys

from . import main

sys.exit(main())
