"""``python -m llip ...`` (and ``torchrun -m llip train ...``): the same as the ``llip`` command."""

import sys

from llip.cli import main

sys.exit(main())
