"""Make the project root importable (the modules live at the top level, one file per concept)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
