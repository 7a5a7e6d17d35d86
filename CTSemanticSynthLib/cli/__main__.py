"""``python -m CTSemanticSynthLib.cli`` (and ``torchrun -m CTSemanticSynthLib.cli``) runs ``ctsynth``."""

import sys

from . import main

sys.exit(main())
