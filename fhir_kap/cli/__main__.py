"""Room: cli/ (layer 4, entry point): may import any room (heavy imports inside the handlers); nothing imports it."""

import sys

from . import main

sys.exit(main())
