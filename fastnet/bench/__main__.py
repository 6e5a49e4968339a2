"""``python -m fastnet.bench``: the ``fastnet bench`` command."""
import sys

from fastnet.bench.command import main

sys.exit(main())
