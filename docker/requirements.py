"""Print the project's runtime dependencies from ``pyproject.toml``, one per line: the image
installs exactly these pins (one source), without the project itself, whose code arrives with
each ``flwr run``.

    python docker/requirements.py pyproject.toml > requirements.txt
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
