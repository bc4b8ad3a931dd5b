"""``python -m kjumpd``: the same as the kjumpd daemon command."""

import sys

from kjumpd.daemon.main import main

sys.exit(main())
