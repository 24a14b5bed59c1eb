"""``python -m crosslayer <verb>`` (what ``torchrun ... -m crosslayer`` runs): the same as ``crosslayer <verb>``."""

import sys

from crosslayer.cli import main

sys.exit(main())
