"""``python -m kjumpd.cli``: the same as the kjumpctl command."""

import sys

from kjumpd.cli import main

sys.exit(main())
