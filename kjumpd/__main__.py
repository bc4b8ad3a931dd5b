"""``python -m kjumpd``: the same as the kjumpd daemon command."""

import sys

from kjumpd.daemon import main

sys.exit(main())
