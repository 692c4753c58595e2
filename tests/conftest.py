import os

import matplotlib

matplotlib.use("Agg")  # tests draw figures without a display
os.environ.setdefault("COURSEKIT_QUICK", "1")
